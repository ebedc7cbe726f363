"""The MoLoRA layer: a frozen linear layer plus E routed LoRA experts (PEFT tuner layer).

Parameters of one adapter (experts stacked so the op sees one tensor each):
    molora_A[name]:      [E·r, d_in]   expert e = rows e·r:(e+1)·r
    molora_B[name]:      [d_out, E·r]  expert e = columns e·r:(e+1)·r
    molora_router[name]: [E, d_in]     router projection (no bias)
The math is in ``molora_kernels`` (``moe_lora``); this module only holds the parameters and plumbing.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from molora_kernels import Router, get_layout, get_router, moe_lora

from .base_layers import base_layer_type
from .decode import decode_module
from .expert_init import resolve as resolve_expert_init
from .router_state import (AuxLossGrad, RegularizerGrad, RouterCollector, in_backward, load_loss_applies,
                           mean_entropy, mean_z)

#: router options that weight a regulariser computed from the routing (option -> the term it weights)
REGULARIZER_OPTIONS = {"entropy_coef": "entropy", "z_loss_coef": "z"}


class RoutedMergeError(RuntimeError):
    """Routed experts cannot be folded into a static weight."""


class MoLoRALayer(BaseTunerLayer):
    adapter_layer_names = ("molora_A", "molora_B", "molora_router", "molora_shared_A", "molora_shared_B")
    other_param_names = ("num_experts", "top_k", "r", "scaling", "lora_dropout", "router_type", "router_options",
                         "router_group", "aux_loss_coef", "aux_loss_mode", "backend", "layout", "router_init",
                         "expert_init", "shared_r", "shared_scaling")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.molora_A = nn.ParameterDict({})
        self.molora_B = nn.ParameterDict({})
        self.molora_router = nn.ParameterDict({})
        #: the always-on shared expert (rank shared_r > 0 only): A [s, d_in], B [d_out, s]
        self.molora_shared_A = nn.ParameterDict({})
        self.molora_shared_B = nn.ParameterDict({})
        self.shared_r: dict[str, int] = {}
        self.shared_scaling: dict[str, float] = {}
        self.router_init: dict[str, str] = {}
        self.expert_init: dict[str, str] = {}
        self.num_experts: dict[str, int] = {}
        self.top_k: dict[str, int] = {}
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.router_type: dict[str, str] = {}
        #: the Router of each adapter, looked up and its functions imported once, when the adapter is attached
        self.routers: dict[str, Router] = {}
        self.router_options: dict[str, dict] = {}
        self.layout: dict[str, str] = {}
        self.aux_loss_coef: dict[str, float] = {}
        self.aux_loss_mode: dict[str, str] = {}
        self.backend: dict[str, str] = {}
        #: where this module's router statistics and aux loss are grouped: the layer index, or "3.attn" / "3.mlp"
        #: when the layer's attention and MLP projections have separate expert counts
        self.router_group: dict[str, Any] = {}
        self.layer_index: Optional[int] = None
        self.module_name: str = ""
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.collector: Optional[RouterCollector] = None
        #: the modules reading the same input (q/k/v, gate/up) that share one shrink GEMM with this one, or None
        self.sibling_group = None

        #: how this base layer's weight is read and written (nn.Linear, Conv1D, bitsandbytes 4-bit/8-bit ...)
        self.base_type = base_layer_type(self.get_base_layer())
        self.in_features, self.out_features = self.base_type.features(self.get_base_layer())
        self.fan_in_fan_out = self.base_type.fan_in_fan_out

    def update_layer(self, adapter_name: str, num_experts: int, top_k: int, r: int, lora_alpha: float,
                     lora_dropout: float, router: str, aux_loss_coef: float, aux_loss_mode: str, backend: str,
                     init_weights: bool = True, inference_mode: bool = False, router_group: Any = None,
                     router_options: Optional[dict] = None, layout: str = "stacked", router_init: str = "kaiming",
                     expert_init: str = "kaiming", shared_expert_r: int = 0) -> None:
        """Create (or re-create) the experts and router of ``adapter_name`` for this layer.

        ``router_group``: the key this module's router statistics and aux loss are grouped under (None: the
        layer index, as the original MoLA code groups all modules of a decoder layer)."""
        if num_experts < 1 or r < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"invalid allocation for {self.module_name}: num_experts={num_experts}, "
                             f"top_k={top_k}, r={r}")
        self.num_experts[adapter_name] = num_experts
        self.top_k[adapter_name] = top_k
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.router_type[adapter_name] = router
        # looked up once; functions imported now, not on first use inside a torch.compile trace (see
        # Router.resolve_functions); options checked once, here
        self.routers[adapter_name] = get_router(router).resolve_functions()
        self.router_options[adapter_name] = self.routers[adapter_name].resolve_options(router_options)
        self.aux_loss_coef[adapter_name] = float(aux_loss_coef)
        self.aux_loss_mode[adapter_name] = aux_loss_mode
        self.backend[adapter_name] = backend
        self.router_group[adapter_name] = self.layer_index if router_group is None else router_group
        er = num_experts * r
        self.layout[adapter_name] = layout
        # stacked: A_all [E·r, d_in]; shared_a (HydraLoRA): one A [r, d_in] for every expert head
        lay = get_layout(layout)
        lay.resolve_op()  # imported now, not inside a torch.compile trace (as the router's functions above)
        self.molora_A[adapter_name] = nn.Parameter(torch.empty(lay.a_rows(num_experts, r), self.in_features))
        self.molora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, er))
        self.molora_router[adapter_name] = nn.Parameter(torch.empty(num_experts, self.in_features))
        self.router_init[adapter_name] = router_init
        self.expert_init[adapter_name] = expert_init
        self.shared_r[adapter_name] = int(shared_expert_r)
        if shared_expert_r > 0:
            self.shared_scaling[adapter_name] = lora_alpha / shared_expert_r
            self.molora_shared_A[adapter_name] = nn.Parameter(torch.empty(shared_expert_r, self.in_features))
            self.molora_shared_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, shared_expert_r))
        self.reset_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.declare_frozen_router(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def declare_frozen_router(self, adapter_name: str) -> None:
        """With one expert the router learns nothing: every router's gate is a softmax over the chosen experts (1
        for a single expert; tested for each registered router), and the load loss and the router regularisers
        skip E = 1. Its [1, d_in] weight stays in the adapter (the saved layout does not change) but is declared
        frozen through PEFT's ``frozen_peft_weight_names``, which ``set_adapter`` / ``set_requires_grad`` re-apply,
        so it is neither counted as trainable nor given optimizer state (a 30-layer LoRA-shaped adapter on
        SmolLM2-135M carried 0.15 M such weights). Called again when a layer is re-created or merged."""
        frozen = dict(self.frozen_peft_weight_names)  # the instance's own copy, never the class default
        names = tuple(n for n in frozen.get(adapter_name, ()) if n != "molora_router")
        if self.num_experts.get(adapter_name, 0) == 1:
            names += ("molora_router",)
        if names:
            frozen[adapter_name] = names
        else:
            frozen.pop(adapter_name, None)
        self.frozen_peft_weight_names = frozen
        self._freeze_non_trainable_peft_weights(adapter_name)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """MoLA init: router and every expert's A ~ kaiming_uniform(a=sqrt(5)) (fan_in = d_in), B = 0.

        ``router_init="zeros"``: router weights 0 (uniform routing at the start). ``expert_init``: how A starts, a
        registered init (:mod:`.expert_init`: ``kaiming``, ``orthogonal`` -- orthogonal rows of kaiming-uniform's
        expected norm sqrt(1/3) --, ``svd`` -- the base weight's top right singular vectors at that norm). The
        shared expert (if any) is initialised as one more expert: kaiming A, B = 0.
        ``init_weights=False`` draws B like A as well (non-zero experts, for tests).
        """
        a = self.molora_A[adapter_name]
        resolve_expert_init(self.expert_init.get(adapter_name, "kaiming"))(
            a, rank=self.r[adapter_name], base_weight=self._oriented_base_weight, module_name=self.module_name)
        if self.router_init.get(adapter_name, "kaiming") == "zeros":
            nn.init.zeros_(self.molora_router[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.molora_router[adapter_name], a=math.sqrt(5))
        bs = [self.molora_B[adapter_name]]
        if adapter_name in self.molora_shared_A:
            nn.init.kaiming_uniform_(self.molora_shared_A[adapter_name], a=math.sqrt(5))
            bs.append(self.molora_shared_B[adapter_name])
        for b in bs:
            if init_weights:
                nn.init.zeros_(b)
            else:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))

    def _oriented_base_weight(self) -> torch.Tensor:
        """The frozen base weight as float ``[d_out, d_in]`` (dequantized; Conv1D's ``[d_in, d_out]`` transposed)."""
        w = self.base_type.dequantize(self.get_base_layer())
        return w.t() if self.fan_in_fan_out else w

    # ------------------------------------------------------------------ merging
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Static weight delta [d_out, d_in] of a single-expert adapter (E = 1: exactly a LoRA)."""
        if self.num_experts[adapter_name] != 1:
            raise RoutedMergeError(
                f"{self.module_name} has {self.num_experts[adapter_name]} routed experts: their mixture depends on "
                f"each token, so it cannot be folded into a static weight. Only layers with num_experts=1 merge; "
                f"use model.merge_static_experts() to merge those and keep the routed ones."
            )
        a, b = self.molora_A[adapter_name], self.molora_B[adapter_name]
        dtype = torch.promote_types(a.dtype, torch.float32)  # bf16/fp16 adapters in fp32; a float64 model stays exact
        delta = (b.to(dtype) @ a.to(dtype)) * self.scaling[adapter_name]
        if adapter_name in self.molora_shared_A:  # the always-on shared expert is static: it merges too
            sa, sb = self.molora_shared_A[adapter_name], self.molora_shared_B[adapter_name]
            delta = delta + (sb.to(dtype) @ sa.to(dtype)) * self.shared_scaling[adapter_name]
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.molora_A:
                continue
            delta = self.delta_weight(name)
            if self.fan_in_fan_out:
                delta = delta.t()
            if self.base_type.quantized:
                warnings.warn(f"merging into the {self.base_type.name} weight of {self.module_name} re-quantizes it: "
                              f"outputs differ from the unmerged model by the rounding")
            new_w = self.base_type.dequantize(base) + delta.to(base.weight.device)
            if safe_merge and not torch.isfinite(new_w).all():
                raise ValueError(f"NaNs or infs after merging adapter {name!r} into {self.module_name}")
            self.base_type.replace_weight(base, new_w)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.delta_weight(name)
            if self.fan_in_fan_out:
                delta = delta.t()
            self.base_type.replace_weight(base, self.base_type.dequantize(base) - delta.to(base.weight.device))


class Linear(nn.Module, MoLoRALayer):
    """MoLoRA around a linear base layer (``nn.Linear``, GPT-2's ``Conv1D``, bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt``: see :mod:`molora.tuner.base_layers`). Input [..., d_in] -> output [..., d_out]."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, layer_index: Optional[int], module_name: str,
                 **kwargs: Any) -> None:
        super().__init__()
        MoLoRALayer.__init__(self, base_layer)
        self.layer_index = layer_index
        self.module_name = module_name
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        collector = self.collector
        want_stats = collector is not None and collector.enabled
        inference = not want_stats and not self.training and not torch.is_grad_enabled()
        for name in self.active_adapters:
            if name not in self.molora_A:
                continue
            # inference: no autograd Function, no statistics, routing resolved once (molora.tuner.decode);
            # tried first, so a decode step does none of the training path's bookkeeping
            delta = decode_module(self, name, x) if inference else None
            if delta is not None:
                if name in self.molora_shared_A:
                    delta = delta + self._shared_expert(name, x).to(delta.dtype)
                result = result + delta.to(result.dtype)
                continue
            real = None if collector is None else collector.mask_for(x)  # [batch, seq] bool, True = real token
            mask = real if self.aux_loss_mode[name] == "masked" else None   # the statistics' tokens
            router = self.routers[name]
            routing_mask = real if router.batch_dependent else None  # capacity's
            token_ids = self._token_ids(name, x)
            group = self.sibling_group  # q/k/v, gate/up: one shared shrink GEMM (molora.tuner.siblings)
            out = None if group is None else group.output_for(self, name, x, mask, want_stats, token_ids,
                                                              routing_mask)
            if out is None:
                out = moe_lora(
                    x,
                    self.molora_A[name],
                    self.molora_B[name],
                    self.molora_router[name],
                    top_k=self.top_k[name],
                    scaling=self.scaling[name],
                    dropout=self.lora_dropout[name],
                    training=self.training,
                    router=router,
                    token_mask=mask,
                    compute_stats=want_stats,
                    backend=self.backend[name],
                    router_options=self.router_options[name],
                    layout=self.layout.get(name, "stacked"),
                    token_ids=token_ids,
                    routing_mask=routing_mask,
                )
            delta = out.delta
            if name in self.molora_shared_A:
                delta = delta + self._shared_expert(name, x).to(delta.dtype)
            if want_stats:
                record = collector.current
                if not in_backward():
                    record.record(self.router_group[name], self.module_name, out.stats, self.num_experts[name],
                                  self.top_k[name], fixed_k=router.fixed_k, aux=router.aux_loss is not None,
                                  selects_top_k=router.selects_top_k)
                coef = self.aux_loss_coef[name]
                # under torch.compile the aux term is an ordinary differentiable loss term (MoLoRAModel adds it
                # from the record); eager mode injects its gradient in backward (works with checkpointing)
                if (coef > 0 and router.aux_loss is not None
                        and load_loss_applies(self.num_experts[name], self.top_k[name], router.fixed_k)
                        and not torch.compiler.is_compiling()
                        and torch.is_grad_enabled() and out.stats.prob_sum.requires_grad):
                    delta = AuxLossGrad.apply(delta, out.stats.prob_sum, record, self.router_group[name], coef)
                delta = self._router_regularizers(name, x, delta, out.routing.probs, mask, record)
            result = result + delta.to(result.dtype)
        return result

    def _shared_expert(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The always-on shared expert: ``s_shared * B_s (A_s dropout(x))`` on every token ([..., d_out]); its
        dropout mask is its own (the routed experts' op draws theirs inside)."""
        a, b = self.molora_shared_A[name], self.molora_shared_B[name]
        h = x.to(a.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        p = self.lora_dropout[name]
        if p > 0 and self.training:
            h = torch.nn.functional.dropout(h, p=p, training=True)
        return torch.nn.functional.linear(torch.nn.functional.linear(h, a), b) * self.shared_scaling[name]

    def _token_ids(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The token ids of x's positions, for routers that route by them (``hash``); None for the others."""
        if not self.routers[name].needs_token_ids:
            return None
        ids = self.collector.ids_for(x) if self.collector is not None else None
        if ids is None:
            raise ValueError(f"{self.module_name}: router {self.router_type[name]!r} routes by token id, but the "
                             f"model's input_ids do not line up with this layer's input {tuple(x.shape)} (call the "
                             f"model with input_ids; inputs_embeds, packed or re-shaped inputs cannot be hashed)")
        return ids

    def terms_needing_stats(self, name: str) -> list[str]:
        """The loss terms of adapter ``name`` computed from the routing statistics (``"aux_loss_coef=0.001"``,
        ``"z_loss_coef=0.01"``): what a training forward loses when ``record_router_stats`` is off."""
        if self.num_experts.get(name, 1) <= 1:
            return []
        terms = []
        if self.aux_loss_coef[name] > 0 and self.routers[name].aux_loss is not None:
            terms.append(f"aux_loss_coef={self.aux_loss_coef[name]:g}")
        opts = self.router_options[name] or {}
        return terms + [f"{key}={opts[key]:g}" for key in REGULARIZER_OPTIONS if opts.get(key, 0.0) > 0]

    def _router_regularizers(self, name: str, x: torch.Tensor, delta: torch.Tensor, probs: torch.Tensor,
                             mask: Optional[torch.Tensor], record) -> torch.Tensor:
        """The router's loss terms besides the aux loss, from its options: ``entropy_coef`` (mean router entropy,
        top-p) and ``z_loss_coef`` (mean logsumexp(logits)^2, Switch). Their weighted values go to the forward
        record (added to the returned loss), their gradients are injected in backward like the aux gradient."""
        opts = self.router_options[name]
        terms = [(opts[key], kind) for key, kind in REGULARIZER_OPTIONS.items() if opts.get(key, 0.0) > 0]
        if not terms or self.num_experts[name] <= 1:
            return delta
        weights = (mask.reshape(-1).to(torch.float32) if mask is not None
                   else torch.ones(probs.shape[0], device=probs.device))
        compiling = torch.compiler.is_compiling()  # then the value itself carries the gradient (no injection)
        for coef, kind in terms:
            if kind == "entropy":
                t, value = probs, (lambda: mean_entropy(probs, weights, differentiable=compiling))
            else:  # the logits again: one [T, E] GEMM, so the z-loss gradient reaches router and input
                t = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), self.molora_router[name]).float()
                value = (lambda t=t: mean_z(t, weights, differentiable=compiling))
            if not in_backward():
                record.regularizers.append(coef * value())
            if not compiling and torch.is_grad_enabled() and t.requires_grad:
                delta = RegularizerGrad.apply(delta, t, weights, record, coef, kind)
        return delta

    def __repr__(self) -> str:
        name = self.active_adapters[0] if self.active_adapters else None
        if name in self.num_experts:
            return (f"molora.Linear(layer={self.layer_index}, experts={self.num_experts[name]}, "
                    f"top_k={self.top_k[name]}, r={self.r[name]}, {self.base_layer!r})")
        return f"molora.Linear({self.base_layer!r})"
