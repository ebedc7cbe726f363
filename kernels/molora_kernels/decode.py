"""The inference path: dense-gated MoE-LoRA under ``torch.no_grad`` with no statistics, no autograd Function and
no per-call checks, on weights concatenated once (op + test + benchmark: ``tests/test_decode.py``,
``molora bench generate``).

Same math as :mod:`torch_fused` (and :mod:`torch_dense`, the reference), for ``G`` modules that read the same
input (one module: G = 1; q/k/v or gate/up siblings: G = 2-3), ``R_g = E_g·r_g``::

    [h_1 | ... | h_G | l_1 | ... | l_G] = x @ W_cat.T          one GEMM, W_cat = [A_1; ...; A_G; W_1; ...; W_G]
    gates_g  = route_g(l_g)  at inference (``training=False``: every router routes each token alone)
    out_g    = base_g + (h_g ⊙ (s_g · gates_g)[:, :, None]) @ B_g.T      one addmm per module

``W_cat`` is built once per weight version by the caller (:func:`concat_weights`; the tuner caches it per module
or sibling group in the compute dtype), so a decode step pays one GEMM for every shrink and router of a group
instead of a concatenation plus a GEMM per module. Where the per-call time goes on CPU with SmolLM2-135M is in
the README ("Generation").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .routers import get_router

__all__ = ["DecodeMember", "concat_weights", "decode_group"]


@dataclass(frozen=True)
class DecodeMember:
    """One module of a decode group, resolved once: its B [d_out, E·r] (compute dtype), experts, top-k, scaling
    (alpha / r), and the router's route function with its checked options (``training=False`` for routers whose
    training routing depends on the batch). Build with :meth:`of`."""

    b_all: torch.Tensor
    num_experts: int
    top_k: int
    scaling: float
    route_fn: Callable
    route_kw: dict
    needs_token_ids: bool = False

    @classmethod
    def of(cls, b_all: torch.Tensor, num_experts: int, top_k: int, scaling: float, router: str,
           router_options: Optional[dict] = None) -> "DecodeMember":
        r = get_router(router)
        kw = r.resolve_options(router_options)
        if r.batch_dependent:
            kw.update(token_mask=None, training=False)
        return cls(b_all, num_experts, top_k, float(scaling), r._resolve(r.route_fn), kw, r.needs_token_ids)


def concat_weights(a_list: Sequence[torch.Tensor], w_list: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``W_cat = [A_1; ...; A_G; W_1; ...; W_G]`` [ΣR + ΣE, d_in] in ``dtype`` (a new tensor, no gradient)."""
    with torch.no_grad():
        return torch.cat([t.to(dtype) for t in (*a_list, *w_list)], dim=0)


@torch.no_grad()
def decode_group(x2: torch.Tensor, wcat: torch.Tensor, members: Sequence[DecodeMember],
                 token_ids: Optional[torch.Tensor] = None,
                 bases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """Outputs ``[out_g [T, d_out_g]]`` (``base_g + delta_g``, or ``delta_g``) of every member on ``x2`` [T, d_in]
    (already in the compute dtype of ``wcat``); ``token_ids`` [T] for routers that route by them. Inference only:
    no gradient, no statistics."""
    tokens = x2.shape[0]
    hl = torch.mm(x2, wcat.t())                                       # [T, ΣR + ΣE]
    outs = []
    r0, e0 = 0, sum(m.b_all.shape[1] for m in members)
    for i, m in enumerate(members):
        rank_all = m.b_all.shape[1]
        logits = hl[:, e0:e0 + m.num_experts]
        if m.needs_token_ids:
            if token_ids is None:
                raise ValueError("a router that routes by token id needs token_ids")
            routing = m.route_fn(logits, m.top_k, token_ids=token_ids, **m.route_kw)
        else:
            routing = m.route_fn(logits, m.top_k, **m.route_kw)
        # scaling multiplied in at least fp32, as the training path does (a float64 model keeps float64)
        gs = (routing.gates.to(torch.promote_types(x2.dtype, torch.float32)) * m.scaling).to(x2.dtype)
        hgs = (hl[:, r0:r0 + rank_all].reshape(tokens, m.num_experts, rank_all // m.num_experts)
               * gs[:, :, None]).reshape(tokens, rank_all)
        base = None if bases is None else bases[i]
        outs.append(torch.mm(hgs, m.b_all.t()) if base is None else torch.addmm(base, hgs, m.b_all.t()))
        r0, e0 = r0 + rank_all, e0 + m.num_experts
    return outs
