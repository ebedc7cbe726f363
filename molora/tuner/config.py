"""MoLoRAConfig: the PEFT config of a mixture of LoRA experts with a layer-wise allocation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig

from molora_kernels import BACKENDS, ROUTERS, get_layout, get_router
from molora_kernels.routers import options_for

from ..allocation import AllocationError, AllocationSpec, auto_method, is_auto, validate_spec
from ..allocation.specs import router_names_of
from .peft_type import PEFT_TYPE

#: the fields that shape an adapter's outputs (what :attr:`MoLoRAConfig.output_fingerprint` covers); training-only
#: fields (aux loss, dropout, initialisation) and how the op runs (backend, sibling sharing) are left out
OUTPUT_FIELDS = ("num_experts", "top_k", "r", "expert_budget", "num_experts_mlp", "lora_alpha", "target_modules",
                 "exclude_modules", "router", "router_options", "layout", "shared_expert_r", "modules_to_save",
                 "allocation", "num_layers")
AUX_LOSS_MODES = ("masked", "original")
ROUTER_INITS = ("kaiming", "zeros")
EXPERT_INITS = ("kaiming", "orthogonal")


@dataclass
class MoLoRAConfig(PeftConfig):
    """Configuration of a MoLoRA adapter (PEFT method ``molora``).

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
            renormalise; default), ``"soft"`` (LoRAMoE-style dense softmax over all experts) or ``"topp"``
            (dynamic top-p: experts until their probability mass reaches ``top_p``, at most ``top_k``).
            Per layer: comma-separated names for contiguous groups of layers (``"topk,topp"``, like block
            notation) or one name per layer.
        router_options: the routers' options, e.g. ``{"top_p": 0.8, "entropy_coef": 1e-4}`` for ``"topp"`` (each
            router takes the keys it declares); unknown names and values outside a range are refused naming the
            allowed ones.
        aux_loss_coef: weight of the MoLA load-balancing loss added to the task loss (0.001 in the paper;
            0 disables it).
        aux_loss_mode: ``"masked"`` (padding tokens excluded, using the attention mask; default) or
            ``"original"`` (exactly the original MoLA code: every position counts, padding included).
        backend: MoE-LoRA op implementation (``"auto"``, ``"torch"``, ...; see ``molora_kernels``).
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
        expert_init: ``"kaiming"`` (MoLA: every expert's A drawn independently) or ``"orthogonal"`` (the stacked
            A_all = [E·r, d_in] has orthogonal rows of the same norm: the experts start reading disjoint input
            directions -- diversified initial experts; needs E·r <= d_in to be exact).
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

    num_experts: AllocationSpec = field(default=4, metadata={"help": "experts per layer"})
    top_k: AllocationSpec = field(default=2, metadata={"help": "experts per token"})
    r: AllocationSpec = field(default=8, metadata={"help": "rank of each expert"})
    expert_budget: Optional[int] = field(default=None, metadata={"help": "total experts over all layers"})
    num_experts_mlp: Optional[AllocationSpec] = field(default=None,
                                                      metadata={"help": "experts of the MLP projections per layer"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the experts' input"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "unused; PEFT reads it"})
    router: Union[str, list[str]] = field(default="topk", metadata={
        "help": "a registered router (topk, soft, topp), 'topk,topp' for groups of layers, or one per layer"})
    router_options: Optional[dict[str, float]] = field(default=None, metadata={"help": "the router's options"})
    aux_loss_coef: float = field(default=0.001, metadata={"help": "load-balancing loss weight"})
    aux_loss_mode: str = field(default="masked", metadata={"help": "masked or original"})
    backend: str = field(default="auto", metadata={"help": "MoE-LoRA op backend"})
    layout: str = field(default="stacked", metadata={"help": "expert layout: stacked (MoLA) or shared_a (HydraLoRA)"})
    share_sibling_shrink: bool = field(default=True, metadata={"help": "one shrink GEMM for q/k/v and gate/up"})
    init_weights: bool = field(default=True)
    router_init: str = field(default="kaiming", metadata={"help": "kaiming (MoLA) or zeros (uniform start)"})
    expert_init: str = field(default="kaiming", metadata={"help": "kaiming (MoLA) or orthogonal (diversified A)"})
    shared_expert_r: int = field(default=0, metadata={"help": "rank of an always-on shared expert (0: none)"})
    modules_to_save: Optional[list[str]] = field(default=None)
    allocation: Optional[list[dict[str, Any]]] = field(default=None)
    num_layers: Optional[int] = field(default=None)
    output_fingerprint: Optional[dict[str, str]] = field(default=None, metadata={
        "help": "per-field hashes written on save; an edited adapter_config.json is refused"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
            if not self.target_modules:
                raise AllocationError("target_modules=[] matches nothing; give module names like ['q_proj', 'v_proj'], "
                                      "a regex, or None for every attention and MLP projection")
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.num_experts, tuple):
            self.num_experts = list(self.num_experts)
        validate_spec(self.num_experts, "num_experts", allow_preset=True)
        if is_auto(self.num_experts):
            from ..allocation.methods import get_method

            try:
                get_method(auto_method(self.num_experts))
            except ValueError as e:
                raise AllocationError(f"num_experts={self.num_experts!r}: {e}") from None
        if isinstance(self.num_experts_mlp, tuple):
            self.num_experts_mlp = list(self.num_experts_mlp)
        if self.num_experts_mlp is not None:
            validate_spec(self.num_experts_mlp, "num_experts_mlp", allow_preset=True)
            if is_auto(self.num_experts):
                raise AllocationError(f"num_experts_mlp={self.num_experts_mlp!r} with num_experts="
                                      f"{self.num_experts!r}: an auto: allocation sets the counts itself "
                                      f"(auto:attn-mlp sets both); drop num_experts_mlp")
        validate_spec(self.top_k, "top_k", allow_preset=False)
        validate_spec(self.r, "r", allow_preset=False)
        if self.expert_budget is not None and (isinstance(self.expert_budget, bool)
                                               or not isinstance(self.expert_budget, int) or self.expert_budget < 1):
            raise AllocationError(f"expert_budget={self.expert_budget!r} must be a positive int (total experts)")
        if isinstance(self.router, tuple):
            self.router = list(self.router)
        if isinstance(self.router, str) and "," not in self.router and self.router not in ROUTERS:
            raise AllocationError(f"router={self.router!r} is not a known router; allowed: {', '.join(ROUTERS)}")
        names = router_names_of(self.router)  # one name, "topk,topp" (groups of layers) or one per layer
        routers = [get_router(n) for n in dict.fromkeys(names)]
        try:
            options_for(names, self.router_options)
        except ValueError as e:
            raise AllocationError(str(e)) from None
        for router in routers:
            if self.backend != "auto" and self.backend in BACKENDS and self.backend not in router.backends:
                raise AllocationError(f"backend={self.backend!r} does not implement router={router.name!r}; backends "
                                      f"for it: {', '.join(router.backends)} (or 'auto')")
        router = routers[0]
        if self.aux_loss_mode not in AUX_LOSS_MODES:
            raise AllocationError(f"aux_loss_mode={self.aux_loss_mode!r}; allowed: {', '.join(AUX_LOSS_MODES)}")
        if not (isinstance(self.aux_loss_coef, (int, float)) and math.isfinite(self.aux_loss_coef)
                and self.aux_loss_coef >= 0):
            raise AllocationError(f"aux_loss_coef={self.aux_loss_coef!r} must be a finite number >= 0")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise AllocationError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise AllocationError(f"lora_alpha={self.lora_alpha!r} must be a finite number > 0")
        if self.router_init not in ROUTER_INITS:
            raise AllocationError(f"router_init={self.router_init!r}; allowed: {', '.join(ROUTER_INITS)}")
        if self.expert_init not in EXPERT_INITS:
            raise AllocationError(f"expert_init={self.expert_init!r}; allowed: {', '.join(EXPERT_INITS)}")
        if isinstance(self.shared_expert_r, bool) or not isinstance(self.shared_expert_r, int) or \
                self.shared_expert_r < 0:
            raise AllocationError(f"shared_expert_r={self.shared_expert_r!r} must be an int >= 0 (0: no shared "
                                  f"expert)")
        if self.backend not in BACKENDS:
            raise AllocationError(f"backend={self.backend!r}; allowed: {', '.join(BACKENDS)}")
        try:
            lay = get_layout(self.layout)
        except ValueError as e:
            raise AllocationError(str(e)) from None
        if self.backend != "auto" and self.backend not in lay.backends:
            raise AllocationError(f"backend={self.backend!r} does not implement layout={self.layout!r}; backends for "
                                  f"it: {', '.join(lay.backends)} (or 'auto')")
        if (all(r.selects_top_k for r in routers) and isinstance(self.num_experts, int) and isinstance(self.top_k, int)
                and self.top_k > self.num_experts and self.expert_budget is None):
            raise AllocationError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}; top_k must be "
                                  f"between 1 and the number of experts")
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
