"""One call for the MoE-LoRA op, several implementations behind it.

``moe_lora`` routes the tokens, computes the output delta of the mixture and returns the routing
statistics the aux loss and telemetry need. ``backend`` selects the implementation:

* ``"torch"``: the dense-gated formula as one autograd Function (``torch_fused``): one GEMM for
  shrink + router, gates folded into a [T, E, r] view, hand-written backward with the A / router
  gradients in one GEMM. The CPU path, and the default for small E·r on any device.
* ``"reference"``: the same formula in plain PyTorch ops with autograd (``torch_dense``): the
  readable reference the others are tested against.
* ``"sparse"``: tokens sorted by expert (index-only argsort), grouped GEMMs (``sparse``): for many
  experts / large ranks, where computing every expert on every token costs more than the gathers.
* ``"triton"``: fused Triton kernels (``triton_moe_lora``, CUDA; optional: only when the module
  and triton import and ``is_triton_available(device)`` says so).
* ``"auto"``: the cheapest available for the device and the sizes (``cost_model.choose_backend``).

The backends are registered in :mod:`.backends` (one ``Backend`` each, one selection function, how to add one);
a layout with a formula of its own (``shared_a``) runs its op from :mod:`.layouts` instead of the stacked one.

All backends compute exactly docs/design.md §2: fp32 softmax, top-k, renormalise; dropout only on the
experts' input (the router sees x); gradients reach the router through the gates and, via
``stats.prob_sum`` / ``Routing.probs``, through the full softmax for the aux loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .backends import BACKEND_REGISTRY, available_backends, get_backend, select_backend
from .layouts import get_layout
from .routers import ALL_BACKENDS, Router, get_router
from .routing import Routing, RouterStats, routing_stats

#: every backend name a config accepts: "auto" (chosen per call) and the concrete ones (the one list lives in the
#: pure router registry, so torch-free recipe checks see the same names)
BACKENDS = ("auto", *ALL_BACKENDS)


@dataclass
class MoLoRAOutput:
    """delta: [..., d_out] in x.dtype, to be added to the frozen layer's output — or, when
    ``moe_lora(..., base=...)`` was given, the frozen output plus the delta (already added).
    stats: RouterStats of this call (None when not requested).
    routing: the Routing of this call (gates and top-k indices carry no gradient; ``probs`` does)."""

    delta: torch.Tensor
    stats: Optional[RouterStats]
    routing: Optional[Routing] = None


def resolve_backend(backend: str, x2: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                    router_weight: torch.Tensor, top_k: int, router: str, needs_backward: bool = True) -> str:
    """The concrete backend ``moe_lora`` runs for these inputs (:func:`molora_kernels.backends.select_backend`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    return select_backend(backend, x2, a_all, b_all, router_weight, top_k, router, needs_backward)


def _check(x, a_all, b_all, router_weight, top_k, router: Router, backend, router_options=None, layout="stacked",
           options_resolved=False):
    num_experts, d_in = router_weight.shape
    lay = get_layout(layout)
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but the router expects d_in={d_in}")
    problem = lay.shape_problem(a_all, b_all, num_experts, d_in)
    if problem:
        raise ValueError(problem)
    if backend != "auto" and backend in BACKENDS and backend not in lay.backends:
        raise ValueError(f"backend {backend!r} does not implement layout {layout!r}; backends for it: "
                         f"{', '.join(lay.backends)} (or 'auto')")
    if not options_resolved:
        router.resolve_options(router_options)  # ValueError naming the routers / the option and its range
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")


def moe_lora(
    x: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    router_weight: torch.Tensor,
    *,
    top_k: int,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    router: Union[str, Router] = "topk",
    token_mask: Optional[torch.Tensor] = None,
    compute_stats: bool = True,
    backend: str = "auto",
    base: Optional[torch.Tensor] = None,
    router_options: Optional[dict] = None,
    layout: str = "stacked",
    token_ids: Optional[torch.Tensor] = None,
    routing_mask: Optional[torch.Tensor] = None,
) -> MoLoRAOutput:
    """Mixture of E LoRA experts on x.

    Args:
        x: [..., d_in] activations (fp32, bf16 or fp16).
        a_all: [E·r, d_in] stacked expert A matrices (expert e = rows e·r:(e+1)·r).
        b_all: [d_out, E·r] stacked expert B matrices.
        router_weight: [E, d_in] router projection (no bias).
        top_k: experts per token (ignored by the soft router).
        scaling: alpha / r.
        dropout, training: LoRA dropout on the experts' input (the router always sees x).
        router: a registered router (:mod:`molora_kernels.routers`): "topk" (MoLA), "soft", "topp", ..., or the
            ``Router`` object itself -- then ``router_options`` must be what its ``resolve_options`` returned (a
            layer resolves its router and options once, when the adapter is attached, not in every call)
        token_mask: [...] matching x's leading dims, True for real tokens; used only for the statistics.
        compute_stats: return RouterStats (needed for the aux loss and telemetry).
        backend: "auto", "torch", "reference", "sparse" or "triton" (see module docstring). A backend
            that cannot run here raises ValueError naming it and listing the available ones.
        base: optional frozen-layer output [..., d_out]; when given the result is ``base + delta``
            accumulated inside the last GEMM (saves a full pass over [T, d_out] on the torch paths).
        router_options: the router's options (``{"top_p": 0.8}``); refused when unknown or out of range.
        layout: the expert layout (:mod:`molora_kernels.layouts`): ``"stacked"`` (a_all [E·r, d_in]) or
            ``"shared_a"`` (one A [r, d_in] for all experts, b_all [d_out, E·r]; torch/reference backends).
        token_ids: [...] int64 matching x's leading dims, for routers that route by token id (``hash``).
        routing_mask: [...] bool matching x's leading dims, True for real tokens: routers whose routing depends on
            the batch (``switch``, ``expert_choice``) give padding no capacity; ignored by the others. With
            ``training=False`` those routers route every token on its own (see :mod:`molora_kernels.routing`).
    Returns:
        MoLoRAOutput(delta [..., d_out] in x.dtype (plus ``base`` if given), stats).
    """
    resolved = isinstance(router, Router)
    r = router if resolved else get_router(router)
    _check(x, a_all, b_all, router_weight, top_k, r, backend, router_options, layout, options_resolved=resolved)
    router = r.name
    lead = x.shape[:-1]
    d_out = b_all.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    base2 = None
    if base is not None:
        if base.shape[:-1] != lead or base.shape[-1] != d_out:
            raise ValueError(f"base {tuple(base.shape)} must be [..., d_out] = {(*lead, d_out)}")
        base2 = base.reshape(-1, d_out)
    needs_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, a_all, b_all, router_weight, base))
    # Mixed precision: under autocast every backend computes in the autocast dtype, with autocast off
    # inside (a hand-written backward must see the dtypes its forward saw: autocast would otherwise
    # run the forward GEMMs in bf16 and the backward ones in fp32 — the "vecdot Float vs BFloat16"
    # crash). The routing softmax stays float32 in every backend.
    compute_dtype = autocast_dtype(x2)
    if compute_dtype is not None:
        x2 = x2.to(compute_dtype)
        if base2 is not None:
            base2 = base2.to(compute_dtype)
    op = get_layout(layout).resolve_op()  # a layout with a formula of its own runs it on any of its backends
    if op is None:
        op = BACKEND_REGISTRY[resolve_backend(backend, x2, a_all, b_all, router_weight, top_k, r,
                                              needs_backward)].run
    kw = dict(top_k=top_k, scaling=scaling, dropout=dropout, training=training, router=router)
    router_options = r.routing_options(router_options)  # loss weights are the tuner's business
    if router_options:  # only routers with routing options take them, and those run on the torch/reference backends
        kw["router_options"] = router_options
    if token_ids is not None:  # likewise for routers that route by token id
        if token_ids.shape != lead:
            raise ValueError(f"token_ids {tuple(token_ids.shape)} must match x's leading dims {tuple(lead)}")
        kw["token_ids"] = token_ids.reshape(-1)
    if routing_mask is not None and r.batch_dependent:
        if routing_mask.shape != lead:
            raise ValueError(f"routing_mask {tuple(routing_mask.shape)} must match x's leading dims {tuple(lead)}")
        kw["routing_mask"] = routing_mask.reshape(-1)
    with (torch.autocast(x2.device.type, enabled=False) if compute_dtype is not None
          else contextlib.nullcontext()):
        out, routing = op(x2, a_all, b_all, router_weight, base=base2, **kw)
    stats = None
    if compute_stats:
        mask = None if token_mask is None else token_mask.reshape(-1)
        stats = routing_stats(routing, mask)
    return MoLoRAOutput(delta=out.reshape(*lead, d_out), stats=stats, routing=routing)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would compute a matmul of ``x`` in, or None when autocast is off for x's device
    (or x is not floating point)."""
    device_type = x.device.type
    if not x.is_floating_point():
        return None
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # device types autocast does not know
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


__all__ = ["BACKENDS", "MoLoRAOutput", "Routing", "available_backends", "get_backend", "moe_lora", "resolve_backend"]
