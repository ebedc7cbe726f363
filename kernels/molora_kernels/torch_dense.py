"""The dense-gated MoE-LoRA formula in plain PyTorch ops: the reference (backend ``"reference"``).

Kept deliberately plain (autograd does the backward): the other backends are tested against it and
against the naive per-expert loop of tests/kernels/test_ops.py. The fast CPU path of the same formula is
:mod:`torch_fused` (backend ``"torch"``).

A mixture of E rank-r experts is one rank-(E·r) LoRA with a token-dependent diagonal gate::

    h     = dropout(x) @ A_all.T                  # [T, E·r]   (shrink, all experts at once)
    delta = s * (h * expand(gates)) @ B_all.T     # [T, d_out] (gate, expand)

with A_all [E·r, d_in] (expert e owns rows e·r:(e+1)·r), B_all [d_out, E·r] (columns likewise),
gates [T, E] float32 and expand(gates) = gates.repeat_interleave(r, dim=1). When the shrink input is
x itself (no dropout, or eval) the router projection rides along in the same GEMM:
``x @ [A_all; W_router].T``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing import route


def shrink_and_logits(x: torch.Tensor, a_all: torch.Tensor, router_weight: torch.Tensor,
                      dropout: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink projection and router logits.

    Args:
        x: [T, d_in]; a_all: [E·r, d_in]; router_weight: [E, d_in] (all cast to x.dtype).
        dropout: LoRA dropout probability applied to the shrink input only (the router sees x).
    Returns:
        h [T, E·r] and logits [T, E], both in x.dtype.
    """
    a = a_all.to(x.dtype)
    w = router_weight.to(x.dtype)
    if dropout > 0.0 and training:
        h = F.dropout(x, p=dropout, training=True) @ a.t()
        logits = x @ w.t()
        return h, logits
    hl = x @ torch.cat([a, w], dim=0).t()
    return hl[:, : a.shape[0]], hl[:, a.shape[0]:]


def gate_expand(h: torch.Tensor, gates: torch.Tensor, b_all: torch.Tensor, scaling: float) -> torch.Tensor:
    """Gate the stacked expert activations and expand.

    Args:
        h: [T, E·r] shrink output; gates: [T, E] float32; b_all: [d_out, E·r]; scaling: alpha / r.
    Returns:
        delta [T, d_out] in h.dtype.
    """
    rank = h.shape[1] // gates.shape[1]
    g = gates.to(h.dtype)
    if rank > 1:
        g = g.repeat_interleave(rank, dim=1)
    return ((h * g) @ b_all.to(h.dtype).t()) * scaling


def moe_lora_shared_a(x2, a, b_all, router_weight, *, top_k, scaling, dropout, training, router, base,
                      router_options=None, token_ids=None, routing_mask=None):
    """The ``shared_a`` layout's op (HydraLoRA, :mod:`molora_kernels.layouts`): one shrink with the shared A
    [r, d_in], the [T, r] result repeated for the E heads, then the dense-gated expand with b_all [d_out, E·r];
    autograd does the backward (the shrink's gradient sums the heads'). Returns (base + delta or delta, Routing)."""
    num_experts = router_weight.shape[0]
    h, logits = shrink_and_logits(x2, a, router_weight, dropout, training)
    routing = route(logits, top_k, router, router_options, token_ids, routing_mask, training)
    delta = gate_expand(h.repeat(1, num_experts), routing.gates, b_all, scaling)
    return (delta if base is None else base + delta), routing
