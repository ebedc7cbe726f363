"""MoLoRAModel: the PEFT tuner that injects MoLoRA layers and adds the aux loss to the model's loss."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists

from molora_kernels import get_router
from molora_kernels.routers import options_for

from ..allocation import AllocationError, LayerAllocation, resolve_allocation
from .base_layers import find_base_layer_type, supported_names
from .config import MoLoRAConfig
from .injection import block_containers, block_position, default_target_regex, linear_module_names, module_kind
from .layer import Linear, MoLoRALayer, RoutedMergeError
from .aux_output import advertise_aux_loss, aux_output, neutralise_router_logits_kwarg
from .router_state import LossGradProbe, RouterCollector, summarize
from .siblings import build_groups


class MoLoRAModel(BaseTuner):
    """Injects a MoLoRA layer in every targeted linear layer of ``model`` (see :class:`MoLoRAConfig`).

    After a forward pass, ``self.last_aux_loss`` holds the (unweighted) MoLA aux loss and
    ``self.router_summary()`` the per-layer routing telemetry of that pass. When the wrapped model returns a
    ``loss``, ``aux_loss_coef * aux`` is added to it (its gradient reaches the routers either way; see
    :mod:`molora.tuner.router_state`).
    """

    prefix: str = "molora_"
    tuner_layer_cls = MoLoRALayer
    target_module_mapping: dict = {}

    # ------------------------------------------------------------------ injection
    def _layer_layout(self, model: nn.Module) -> tuple[dict[str, int], Optional[int]]:
        containers = block_containers(model)
        offsets, total = {}, 0
        for name, length in containers.items():
            offsets[name] = total
            total += length
        return offsets, (total if containers else None)

    def _layer_index(self, model: nn.Module, key: str) -> Optional[int]:
        pos = block_position(model, key)
        if pos is None:
            return None
        return self._layer_offsets[pos.container] + pos.index

    def _pre_injection_hook(self, model: nn.Module, config: MoLoRAConfig, adapter_name: str) -> None:
        self._layer_offsets, num_layers = self._layer_layout(model)
        if config.target_modules is None:
            regex = default_target_regex(model)
            if regex is None:
                raise AllocationError(
                    "target_modules=None means every linear layer inside the model's numbered blocks, but this model "
                    f"has no such blocks; name the modules to adapt (linear layers here: "
                    f"{', '.join(linear_module_names(model)) or 'none'})"
                )
            config.target_modules = regex
        matched = [n for n, _ in model.named_modules() if n and check_target_module_exists(config, n)]
        if not matched:
            raise AllocationError(
                f"target_modules={sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules!r} "
                f"matches no module of {type(model).__name__}; linear layers here are named: "
                f"{', '.join(linear_module_names(model)) or 'none'}"
            )
        indices = {n: self._layer_index(model, n) for n in matched}
        outside = [n for n, i in indices.items() if i is None]
        per_layer = [f"{f}={getattr(config, f)!r}" for f in ("num_experts", "top_k", "r")
                     if not isinstance(getattr(config, f), int)]
        if config.expert_budget is not None:
            per_layer.append(f"expert_budget={config.expert_budget!r}")
        if num_layers is not None and outside and per_layer:
            raise AllocationError(
                f"{', '.join(per_layer)} is per layer, but target modules {outside[:3]} lie outside the "
                f"numbered blocks; exclude them or give num_experts, top_k and r as ints (and no expert_budget)"
            )
        if config.num_experts_mlp is not None:
            kinds = {n: module_kind(block_position(model, n).rest) for n, i in indices.items() if i is not None}
            unknown = [n for n, k in kinds.items() if k is None]
            if unknown:
                raise AllocationError(
                    f"num_experts_mlp={config.num_experts_mlp!r} gives attention and MLP projections their own expert "
                    f"counts, but {len(unknown)} target module(s) are in neither an attention nor an MLP sub-block by "
                    f"name, e.g. {unknown[:3]}; exclude them or drop num_experts_mlp")
        alloc = resolve_allocation(config.num_experts, config.top_k, config.r, num_layers,
                                   expert_budget=config.expert_budget, router=config.router,
                                   num_experts_mlp=config.num_experts_mlp)
        table = [a.row() for a in alloc]
        if config.layout != "stacked":  # the shapes of A follow the layout: part of what a checkpoint must match
            table = [{**row, "layout": config.layout} for row in table]
        if config.allocation is not None and (config.allocation != table or config.num_layers != num_layers):
            raise AllocationError(_allocation_mismatch(config.allocation, table, config.num_layers, num_layers))
        config.allocation = table
        config.num_layers = num_layers
        self._allocations = getattr(self, "_allocations", {})
        self._allocations[adapter_name] = alloc

    def _prepare_adapter_config(self, peft_config: MoLoRAConfig, model_config: dict) -> MoLoRAConfig:
        return peft_config  # target modules are resolved from the model itself in _pre_injection_hook

    def _create_and_replace(self, config: MoLoRAConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: Optional[str] = None) -> None:
        layer = self._layer_index(self.model, current_key)
        alloc: list[LayerAllocation] = self._allocations[adapter_name]
        a = alloc[layer] if (layer is not None and len(alloc) > 1) else alloc[0]
        group = layer
        kind = None
        if a.num_experts_mlp is not None:  # attention and MLP of this layer: separate counts and aux-loss groups
            kind = module_kind(block_position(self.model, current_key).rest)
            group = f"{layer}.{kind}"
        router = a.router or config.router  # per layer, or the config's single router
        options = options_for([router], {k: v for k, v in (config.router_options or {}).items()
                                         if k in {o.name for o in get_router(router).options}})[router]
        kwargs = dict(num_experts=a.experts_for(kind), top_k=a.top_k, router_group=group, r=a.r,
                      lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, router=router,
                      aux_loss_coef=config.aux_loss_coef, aux_loss_mode=config.aux_loss_mode, backend=config.backend,
                      init_weights=config.init_weights, inference_mode=config.inference_mode, router_options=options,
                      layout=config.layout, router_init=getattr(config, "router_init", "kaiming"),
                      expert_init=getattr(config, "expert_init", "kaiming"),
                      shared_expert_r=getattr(config, "shared_expert_r", 0) or 0)
        if isinstance(target, MoLoRALayer):
            target.update_layer(adapter_name, **kwargs)
            return
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if find_base_layer_type(base) is None:
            raise AllocationError(f"target module {current_key!r} is a {type(base).__module__}.{type(base).__name__}; "
                                  f"MoLoRA wraps these base layers only: {supported_names()}")
        new_module = Linear(target, adapter_name, layer_index=layer, module_name=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: MoLoRAConfig, adapter_name: str) -> None:
        if not hasattr(self, "collector"):
            self.collector = RouterCollector()
            sig = inspect.signature(model.forward).parameters
            names = list(sig)
            self._mask_pos = names.index("attention_mask") if "attention_mask" in names else None
            # Hooks on the wrapped model itself, not MoLoRAModel.forward: a plain PeftModel (no task_type) calls
            # the wrapped model directly and never runs the tuner's forward.
            self._hooks = [model.register_forward_pre_hook(self._start_forward, with_kwargs=True),
                           model.register_forward_hook(self._end_forward)]
        trains_aux = False
        for m in model.modules():
            if isinstance(m, MoLoRALayer):
                m.collector = self.collector
                trains_aux = trains_aux or any(get_router(r).aux_loss is not None for r in m.router_type.values())
        if trains_aux:  # TRL's trainers then weight and log `outputs.aux_loss` (see molora.tuner.aux_output)
            advertise_aux_loss(model, config.aux_loss_coef)
        # q/k/v and gate/up: one shrink GEMM per group (molora.tuner.siblings)
        self.sibling_groups = build_groups(model, MoLoRALayer) if config.share_sibling_shrink else []
        if not config.share_sibling_shrink:
            for m in model.modules():
                if isinstance(m, MoLoRALayer):
                    m.sibling_group = None
        self.last_aux_loss: Optional[torch.Tensor] = None

    def _start_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_pos is not None and len(args) > self._mask_pos:
            mask = args[self._mask_pos]
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]  # input_ids is the first positional argument of every HF model forward
        # "training" for the default mode: any forward that may feed an objective -- train mode, autograd on (a
        # hand-written loop in eval mode still trains), or labels given (the returned loss keeps coef * aux);
        # only pure inference (eval mode, no_grad, no labels: evaluation scoring, generation) skips the statistics
        wants_stats = module.training or torch.is_grad_enabled() or kwargs.get("labels") is not None
        self.collector.start_forward(mask if isinstance(mask, torch.Tensor) else None,
                                     ids if isinstance(ids, torch.Tensor) else None, training=wants_stats)
        if self.collector.mode is False and torch.is_grad_enabled():
            self._check_stats_for_training()
        if neutralise_router_logits_kwarg(module, kwargs):
            return args, kwargs
        return None

    def _end_forward(self, module: nn.Module, args: tuple, out: Any) -> Any:
        """After the wrapped model's forward: store the aux loss and add ``coef * aux`` to the returned loss."""
        # Under torch.compile the aux loss and the regularisers are plain differentiable terms (autograd carries
        # their gradient through `loss` and `outputs.aux_loss`); eager mode injects them in backward instead.
        compiling = torch.compiler.is_compiling()
        aux = self.collector.current.aux_loss(differentiable=compiling)
        self.last_aux_loss = aux if aux is None else aux.detach()
        cfg = self.peft_config[self.active_adapters[0]]
        reg = self.collector.current.regularizer()
        if (aux is not None or reg is not None) and isinstance(out, dict):
            if aux is not None:  # in training a leaf whose gradient a trainer weighting it (TRL) reports back
                out["aux_loss"] = aux_output(aux, self.collector.current, cfg.aux_loss_coef) if (
                    cfg.aux_loss_coef > 0 and self.collector.current.has_aux() and not compiling) else aux
            if reg is not None:
                out["router_regularizer"] = reg
            add_aux = cfg.aux_loss_coef > 0 and aux is not None and self.collector.current.has_aux()
            if (add_aux or reg is not None) and out.get("loss") is not None:
                loss = out["loss"]
                if add_aux:
                    loss = loss + cfg.aux_loss_coef * aux.to(loss.dtype)
                if reg is not None:  # already weighted by its coefficient (router_options)
                    loss = loss + reg.to(loss.dtype)
                if loss.requires_grad and loss.dim() == 0 and not compiling:  # injected gradient follows the loss
                    loss = LossGradProbe.apply(loss, self.collector.current)
                out["loss"] = loss
        return out

    def router_summary(self) -> dict:
        """Per-layer routing telemetry of the last forward pass (see :func:`molora.tuner.router_state.summarize`)."""
        return summarize(self.collector.current)

    @property
    def record_router_stats(self) -> Optional[bool]:
        """Whether forwards record the routers' statistics (what :meth:`router_summary`, the aux loss, the router
        regularisers and the training telemetry are computed from). ``None`` (default): in every forward that may
        feed an objective (train mode, autograd enabled, or ``labels`` given) -- a pure inference forward (eval
        mode under ``no_grad`` without labels: scoring, generation) computes no statistics, which are ~16 % of greedy
        generation with SmolLM2-135M and ▽ on CPU. ``True``: in every forward (set it to read
        :meth:`router_summary` after an eval-mode forward, as ``merge-experts`` does). ``False``: never; a
        training forward that needs them (a load-balancing loss or a router regulariser with a positive
        coefficient) then refuses to run instead of silently dropping those terms."""
        return self.collector.mode

    @record_router_stats.setter
    def record_router_stats(self, value: Optional[bool]) -> None:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"record_router_stats={value!r}: True (every forward), False (none) or None (every "
                             f"forward but pure inference, the default)")
        self.collector.mode = value

    def _check_stats_for_training(self) -> None:
        """Raise when a training forward would lose its aux loss or router regularisers to record_router_stats."""
        for m in self.model.modules():
            if isinstance(m, MoLoRALayer):
                needs = [t for name in m.active_adapters if name in m.router_type for t in m.terms_needing_stats(name)]
                if needs:
                    raise RuntimeError(
                        f"record_router_stats is False in a forward with autograd on, but {m.module_name} trains with "
                        f"{needs[0]}: that term needs the routing statistics and would be silently missing. Set "
                        f"model.base_model.record_router_stats = True to train (or the coefficient to 0).")

    # ------------------------------------------------------------------ merging
    def _check_routed(self, adapter_names: Optional[list[str]] = None) -> None:
        """Raise :class:`RoutedMergeError` before anything is merged if a layer to merge has routed experts.

        (Checking layer by layer while merging would leave the model half merged and half unloaded.)
        """
        routed = [f"{m.module_name} ({m.num_experts[a]} experts)" for m in self.model.modules()
                  if isinstance(m, MoLoRALayer) for a in (adapter_names or m.active_adapters)
                  if m.num_experts.get(a, 1) > 1]
        if routed:
            raise RoutedMergeError(
                f"cannot merge: {len(routed)} MoLoRA layers have routed experts, e.g. {', '.join(routed[:3])}. Their "
                f"mixture depends on each token, so it cannot be folded into a static weight; only layers with "
                f"num_experts=1 merge. Use model.merge_static_experts() to merge those and keep the routed ones."
            )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_routed(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge:
            self._check_routed(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    def merge_static_experts(self, adapter_names: Optional[list[str]] = None) -> int:
        """Merge every layer that has a single expert (E = 1, exactly a LoRA) into its base weight.

        Routed layers (E > 1) are left as they are: their mixture depends on each token. Returns the number of
        layers merged.
        """
        n = 0
        for m in self.model.modules():
            if isinstance(m, MoLoRALayer):
                names = adapter_names or m.active_adapters
                static = [a for a in names if m.num_experts.get(a) == 1]
                if static:
                    m.merge(adapter_names=static)
                    n += 1
        return n


def _allocation_mismatch(saved: list[dict], now: list[dict], saved_layers, now_layers) -> str:
    if saved_layers != now_layers:
        return (f"this checkpoint's allocation was made for a model with {saved_layers} layers, but this model has "
                f"{now_layers}; load it into the same architecture")
    def show(row: dict) -> str:
        mlp = f" (MLP {row['num_experts_mlp']})" if row.get("num_experts_mlp") is not None else ""
        extra = "".join(f", {k} {row[k]}" for k in ("router", "layout") if row.get(k) is not None)
        return f"{row['num_experts']}{mlp} experts/top-{row['top_k']}/r{row['r']}{extra}"

    diffs = [f"layer {s.get('layer')}: checkpoint {show(s)} vs config {show(n)}"
             for s, n in zip(saved, now) if s != n]
    return ("the checkpoint's allocation differs from the config's: " + "; ".join(diffs[:5])
            + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""))
