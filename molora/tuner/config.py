"""MoLoRAConfig: the PEFT config of a mixture of LoRA experts with a layer-wise allocation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from peft.config import PeftConfig

from ..allocation import AllocationError
from ..allocation.adapter_fields import AUX_LOSS_MODES, ROUTER_INITS, AdapterFields, check_all
from .peft_type import PEFT_TYPE

#: the fields that shape an adapter's outputs (what :attr:`MoLoRAConfig.output_fingerprint` covers); training-only
#: fields (aux loss, dropout, initialisation) and how the op runs (backend, sibling sharing) are left out
OUTPUT_FIELDS = ("num_experts", "top_k", "r", "expert_budget", "num_experts_mlp", "lora_alpha", "target_modules",
                 "exclude_modules", "router", "router_options", "layout", "shared_expert_r", "modules_to_save",
                 "allocation", "num_layers")
__all__ = ["MoLoRAConfig", "OUTPUT_FIELDS", "AUX_LOSS_MODES", "ROUTER_INITS"]


@dataclass
class MoLoRAConfig(PeftConfig, AdapterFields):
    """Configuration of a MoLoRA adapter (PEFT method ``molora``).

    The fields a user sets, their defaults and checks are :class:`~molora.allocation.adapter_fields.AdapterFields`
    (shared with recipes); this class adds what molora fills in (``allocation``, ``num_layers``,
    ``output_fingerprint``) and PEFT's own fields.

    Every targeted linear layer gets E_l LoRA experts of rank r_l and a router picking top-k_l of them per
    token. ``num_experts``, ``top_k`` and ``r`` each take an int, a per-layer list, MoLA block notation
    (``"2,4,6,8"`` / ``"2468"``) or, for ``num_experts``, a preset shape (``"inverted_triangle"`` / ``"▽"``,
    ``"triangle"``, ``"uniform"``, ``"hourglass"``, ``"diamond"``); see :mod:`molora.allocation`.

    Args:
        num_experts: experts per layer.
        top_k: experts each token is routed to (MoLA router). Must be <= the experts of its layer.
        r: rank of every expert of a layer.
        expert_budget: total experts over all layers; scales ``num_experts``' shape to that sum.
        num_experts_mlp: experts of the MLP (feed-forward) projections of each layer, when they should differ
            from the attention projections (``num_experts`` then holds for attention); same forms as
            ``num_experts`` (no ``auto:``; ``auto:attn-mlp`` fills both). Each layer's attention modules and its
            MLP modules then have separate routers' aux-loss groups. None: one count per layer.
        lora_alpha: LoRA alpha; the scaling of a layer is ``lora_alpha / r_l``.
        lora_dropout: dropout on the experts' input (the router sees the input without dropout).
        target_modules: module names (suffix match) or a regex (full match). None: every linear projection of
            attention and MLP inside the model's numbered blocks.
        exclude_modules: names/regex never to adapt.
        router: a registered router (:mod:`molora_kernels.routers`): ``"topk"`` (MoLA: softmax, top-k,
            renormalise; default), ``"soft"`` (LoRAMoE-style dense softmax over all experts), ``"topp"`` (dynamic
            top-p: experts until their probability mass reaches ``top_p``, at most ``top_k``), ``"switch"``
            (top-1 with a capacity), ``"expert_choice"`` (experts pick tokens), ``"hash"`` (fixed expert per
            token id), or one registered with ``register_router``.
            Per layer: comma-separated names for contiguous groups of layers (``"topk,topp"``, like block
            notation) or one name per layer.
        router_options: the routers' options, e.g. ``{"top_p": 0.8, "entropy_coef": 1e-4}`` for ``"topp"`` (each
            router takes the keys it declares); unknown names and values outside a range are refused naming the
            allowed ones.
        aux_loss_coef: weight of the MoLA load-balancing loss added to the task loss (0.001 in the paper;
            0 disables it).
        aux_loss_mode: ``"masked"`` (padding tokens excluded, using the attention mask; default) or
            ``"original"`` (exactly the original MoLA code: every position counts, padding included).
        backend: MoE-LoRA op implementation: ``"auto"`` or a registered backend (``"torch"``, ``"reference"``,
            ``"sparse"``, ``"triton"``; :mod:`molora_kernels.backends`).
        layout: expert layout (:mod:`molora_kernels.layouts`): ``"stacked"`` (an A and a B per expert, MoLA) or
            ``"shared_a"`` (HydraLoRA: one A shared by the experts, one B head each; fewer parameters and one shrink).
            Recorded in the allocation table; an adapter loads only into its own layout.
        share_sibling_shrink: modules that read the same input (q/k/v, gate/up) compute their shrink and router
            GEMMs as one (:mod:`molora.tuner.siblings`); with ``lora_dropout > 0`` they then share one dropout mask
            per group. False: every module on its own (own dropout mask). Not part of the saved allocation.
        init_weights: MoLA init (router and A kaiming-uniform(a=sqrt(5)), B = 0); False: random B (tests).
        router_init: ``"kaiming"`` (MoLA: kaiming-uniform router weights, so each token starts with its own random
            preference) or ``"zeros"`` (every token starts uniform over the experts; the router learns from the
            experts' differences only).
        expert_init: a registered init (:mod:`molora.allocation.expert_inits`): ``"kaiming"`` (MoLA: every expert's
            A drawn independently), ``"orthogonal"`` (the stacked A_all = [E·r, d_in] has orthogonal rows of the
            same norm: the experts start reading disjoint input directions -- diversified initial experts; needs
            E·r <= d_in to be exact) or ``"svd"`` (the rows are the base weight's top right singular vectors, dealt
            round-robin to the experts, PiSSA-style without changing the base). B = 0 under every init.
        shared_expert_r: rank of an always-on shared expert beside the routed ones (DeepSeekMoE / MixLoRA style):
            a plain LoRA of this rank with the same alpha/r scaling rule, added to every token's output whatever
            the router does; 0 (default): none. Its parameters count toward the sweep's matched-LoRA rank.
        modules_to_save: extra modules trained and saved in full (e.g. a classification head).
        allocation: filled in when the adapter is injected: the resolved per-layer table
            (``[{"layer", "num_experts", "top_k", "r"}, ...]``); saved in adapter_config.json and checked
            when the adapter is loaded.
        num_layers: the layer count the allocation was resolved for (None: a model without numbered layers).
        output_fingerprint: written by :meth:`to_dict` (so into every saved adapter_config.json): a short hash of
            each field that shapes the adapter's outputs (:data:`OUTPUT_FIELDS`). A loaded config whose fields no
            longer match it -- adapter_config.json edited after saving -- is refused naming the fields. None (a
            config built in code, an adapter saved before molora 0.4): not checked.
    """

    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "unused; PEFT reads it"})
    allocation: Optional[list[dict[str, Any]]] = field(default=None)
    num_layers: Optional[int] = field(default=None)
    output_fingerprint: Optional[dict[str, str]] = field(default=None, metadata={
        "help": "per-field hashes written on save; an edited adapter_config.json is refused"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        for name in ("num_experts", "num_experts_mlp", "router"):  # tuples (code, YAML) as the lists JSON gives
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        check_all(self)  # every field's check, then the checks between fields (molora.allocation.adapter_fields)
        for name in ("target_modules", "exclude_modules"):  # PEFT matches names against a set
            if isinstance(getattr(self, name), (list, tuple)):
                setattr(self, name, set(getattr(self, name)))
        self._check_output_fingerprint()  # last: on the normalised fields (sets, lists), as they were saved

    def compute_output_fingerprint(self) -> dict[str, str]:
        """``{field: first 12 hex digits of the SHA-256 of its JSON}`` for :data:`OUTPUT_FIELDS` (sets as sorted
        lists, so the hash survives a save and load)."""
        import hashlib
        import json

        def norm(v):
            if isinstance(v, (set, frozenset)):
                return sorted(v)
            if isinstance(v, tuple):
                return list(v)
            return v

        return {k: hashlib.sha256(json.dumps(norm(getattr(self, k)), sort_keys=True, default=str).encode())
                .hexdigest()[:12] for k in OUTPUT_FIELDS}

    def _check_output_fingerprint(self) -> None:
        saved = self.output_fingerprint
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise AllocationError(f"output_fingerprint={saved!r} in the adapter config is not the per-field table "
                                  f"molora writes; the config was edited: restore it from the adapter's source")
        now = self.compute_output_fingerprint()
        changed = [k for k in OUTPUT_FIELDS if k in saved and saved[k] != now[k]]
        if changed:
            raise AllocationError(
                f"adapter config edited after the adapter was saved: {', '.join(changed)} "
                f"({', '.join(f'{k}={getattr(self, k)!r}' for k in changed[:3])} now) no longer match the values "
                f"its weights were trained with, so it would load with other outputs; restore those fields, or "
                f"retrain with the new settings")

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict of the fields, with :attr:`output_fingerprint` computed from the current values (what
        ``save_pretrained`` writes)."""
        d = super().to_dict()
        d["output_fingerprint"] = self.compute_output_fingerprint()
        return d
