"""The inference path: dense-gated MoE-LoRA under ``torch.no_grad`` with no statistics, no autograd Function and
no per-call checks (op + test + benchmark: ``tests/tuner/test_decode.py``, ``molora bench generate``).

Same math as :mod:`torch_fused` (and :mod:`torch_dense`, the reference), per module, ``R = E·r``::

    h        = x @ A_all.T                   [T, R]
    logits   = x @ W_router.T                [T, E]
    gates    = route(logits) at inference (``training=False``: every router routes each token alone; the router's
               own function, so a float64 model keeps MoLA's exact gates: tests/tuner/test_convert.py)
    out      = base + (h ⊙ (s · gates)[:, :, None]) @ B_all.T      one addmm

The weights are read where they live (no concatenated copy: a copy kept between calls could go stale when a
user writes ``param.data``, which no version counter sees, and building one per call moves the weights through
memory twice); what is resolved once per module is the router (its function and checked options), so a call
does no dictionary work. Where the per-call time goes on CPU with SmolLM2-135M is in the README ("Generation").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .routers import get_router

__all__ = ["DecodeMember", "decode"]


@dataclass(frozen=True)
class DecodeMember:
    """One module's routing, resolved once: experts, top-k, scaling (alpha / r), and the router's route function
    with its checked options (``training=False`` for routers whose training routing depends on the batch).
    Build with :meth:`of`."""

    num_experts: int
    top_k: int
    scaling: float
    route_fn: Callable
    route_kw: dict
    needs_token_ids: bool = False

    @classmethod
    def of(cls, num_experts: int, top_k: int, scaling: float, router: str,
           router_options: Optional[dict] = None) -> "DecodeMember":
        r = get_router(router)
        kw = r.resolve_options(router_options)
        if r.batch_dependent:
            kw.update(token_mask=None)
        if r.batch_dependent or r.stochastic:
            kw.update(training=False)
        return cls(num_experts, top_k, float(scaling), r._resolve(r.route_fn), kw, r.needs_token_ids)


@torch.no_grad()
def decode(x2: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, router_weight: torch.Tensor,
           member: DecodeMember, token_ids: Optional[torch.Tensor] = None,
           base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``base + delta`` (or ``delta``) [T, d_out] on ``x2`` [T, d_in]; the weights are cast to x2's dtype (a
    no-op when they already have it); ``token_ids`` [T] for routers that route by them. Inference only: no
    gradient, no statistics."""
    dt = x2.dtype
    tokens, m = x2.shape[0], member
    # (every op here is a few microseconds at decode sizes: casts only where the dtype differs, no indexing)
    a = a_all if a_all.dtype == dt else a_all.to(dt)
    w = router_weight if router_weight.dtype == dt else router_weight.to(dt)
    b = b_all if b_all.dtype == dt else b_all.to(dt)
    h = torch.mm(x2, a.t())                                            # [T, R]
    logits = torch.mm(x2, w.t())                                       # [T, E]
    if m.needs_token_ids:
        if token_ids is None:
            raise ValueError("a router that routes by token id needs token_ids")
        routing = m.route_fn(logits, m.top_k, token_ids=token_ids, **m.route_kw)
    else:
        routing = m.route_fn(logits, m.top_k, **m.route_kw)
    gates = routing.gates                                               # [T, E] fp32
    # scaling multiplied in at least fp32, as the training path does (a float64 model keeps float64)
    if dt == torch.float32:
        gs = gates * m.scaling
    else:
        gs = (gates.to(torch.promote_types(dt, torch.float32)) * m.scaling).to(dt)
    rank_all = h.shape[1]
    hgs = (h.view(tokens, m.num_experts, rank_all // m.num_experts) * gs.unsqueeze(-1)).view(tokens, rank_all)
    return torch.mm(hgs, b.t()) if base is None else torch.addmm(base, hgs, b.t())
