"""One call for the MoE-LoRA op, several implementations behind it.

``moe_lora`` routes the tokens, computes the output delta of the mixture and returns the routing
statistics the aux loss and telemetry need. ``backend`` selects the implementation:

* ``"torch"``: the dense-gated formula in PyTorch (reference; the CPU path).
* ``"auto"``: the best available for the device and the sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .routing import ROUTERS, RouterStats, route, routing_stats
from . import torch_dense

BACKENDS = ("auto", "torch")


@dataclass
class MoLoRAOutput:
    """delta: [..., d_out] in x.dtype, to be added to the frozen layer's output.
    stats: RouterStats of this call (None when not requested)."""

    delta: torch.Tensor
    stats: Optional[RouterStats]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``."""
    return ["torch"]


def _check(x, a_all, b_all, router_weight, top_k, router, backend):
    num_experts, d_in = router_weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but the router expects d_in={d_in}")
    if a_all.shape[0] % num_experts or a_all.shape[1] != d_in:
        raise ValueError(f"a_all {tuple(a_all.shape)} must be [E·r, d_in] with E={num_experts}, d_in={d_in}")
    if b_all.shape[1] != a_all.shape[0]:
        raise ValueError(f"b_all {tuple(b_all.shape)} must be [d_out, E·r={a_all.shape[0]}]")
    if router not in ROUTERS:
        raise ValueError(f"router={router!r}; allowed: {', '.join(ROUTERS)}")
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
    router: str = "topk",
    token_mask: Optional[torch.Tensor] = None,
    compute_stats: bool = True,
    backend: str = "auto",
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
        router: "topk" (MoLA) or "soft".
        token_mask: [...] matching x's leading dims, True for real tokens; used only for the statistics.
        compute_stats: return RouterStats (needed for the aux loss and telemetry).
        backend: see module docstring.
    Returns:
        MoLoRAOutput(delta [..., d_out] in x.dtype, stats).
    """
    _check(x, a_all, b_all, router_weight, top_k, router, backend)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    h, logits = torch_dense.shrink_and_logits(x2, a_all, router_weight, dropout, training)
    routing = route(logits, top_k, router)
    delta = torch_dense.gate_expand(h, routing.gates, b_all, scaling)
    stats = None
    if compute_stats:
        mask = None if token_mask is None else token_mask.reshape(-1)
        stats = routing_stats(routing, mask)
    return MoLoRAOutput(delta=delta.reshape(*lead, b_all.shape[0]), stats=stats)
