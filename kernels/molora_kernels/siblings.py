"""One shrink for sibling projections: modules that read the same input (q/k/v, gate/up) share their shrink and
router GEMMs.

For members ``i`` with stacked experts ``A_i`` [R_i, d_in] and routers ``W_i`` [E_i, d_in] on the same x [T, d_in]::

    forward   [h_1 .. h_n | l_1 .. l_n] = x @ [A_1; ..; A_n; W_1; ..; W_n].T        one GEMM (no dropout)
              h = dropout(x) @ [A_1; ..; A_n].T,  l = x @ [W_1; ..; W_n].T          two GEMMs (dropout)
              then per member the dense-gated expand of :mod:`torch_fused`: route(l_i), gates folded into
              h_i, out_i = (base_i +) hgs_i @ B_i.T
    backward  per member: dB_i, dh_i = dhgs_i ⊙ gates_i, dl_i (as torch_fused)
              [dA; dW] = [dh | dl].T @ x  and  dx = [dh | dl] @ [A; W]               one GEMM each

x is read once per direction instead of once per member: the shrink GEMMs have a small N (R + E, e.g. 72) and
are bound by reading x, so three members cost about one. Dropout: **one mask per sibling group** (every member's
experts read the same ``dropout(x)``; each member's own draw would need its own GEMM over its own masked copy).
That is a modelling choice, not an approximation of the per-module masks: a group mask is a valid LoRA dropout for
each member, but the masks of q, k and v are then correlated. The mask is drawn with ``F.dropout`` from the global
RNG and replayed in backward from the saved RNG state (nothing [T, d_in]-sized is saved for it), like
:mod:`torch_fused`.

Outputs and gradients equal the per-module op (``backend="torch"``/``"reference"``) on the same expert input:
tests compare them with and without dropout (the reference then gets the group's mask).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .routing import Routing, route, routing_stats
from .torch_fused import _replay_dropout_scale, _rng_state, finish_forward, gate_and_expand


@dataclass
class SiblingOperands:
    """One member: a_all [E·r, d_in] (stacked layout), b_all [d_out, E·r], router_weight [E, d_in], and its routing
    settings (``router_options`` resolved, ``token_ids`` [T] or None, ``base`` [T, d_out] or None, ``routing_mask``
    [T] bool or None)."""

    a_all: torch.Tensor
    b_all: torch.Tensor
    router_weight: torch.Tensor
    top_k: int
    scaling: float
    router: str = "topk"
    router_options: Optional[dict] = None
    token_ids: Optional[torch.Tensor] = None
    base: Optional[torch.Tensor] = None
    routing_mask: Optional[torch.Tensor] = None   # [T] bool for batch-dependent routers (padding takes no capacity)


class GroupShrink(torch.autograd.Function):
    """(h [T, ΣR], logits [T, ΣE]) = (dropout(x) @ a_cat.T, x @ w_cat.T); one GEMM when ``p == 0``."""

    @staticmethod
    def forward(ctx, x, a_cat, w_cat, p: float):
        rng = None
        if p > 0.0:
            rng = _rng_state(x.device)
            xd = torch.nn.functional.dropout(x, p=p, training=True)
            h, logits = torch.mm(xd, a_cat.t()), torch.mm(x, w_cat.t())
            wcat = None
        else:
            wcat = torch.cat([a_cat, w_cat], dim=0)
            hl = torch.mm(x, wcat.t())
            h, logits = hl[:, : a_cat.shape[0]], hl[:, a_cat.shape[0]:]
        ctx.save_for_backward(x, a_cat, w_cat, wcat, rng)
        ctx.p = p
        ctx.device_type = x.device.type
        return h, logits

    @staticmethod
    def backward(ctx, dh, dlogits):
        with torch.autocast(ctx.device_type, enabled=False):
            x, a_cat, w_cat, wcat, rng = ctx.saved_tensors
            dt = x.dtype
            dh = torch.zeros(x.shape[0], a_cat.shape[0], dtype=dt, device=x.device) if dh is None else dh.to(dt)
            dlogits = (torch.zeros(x.shape[0], w_cat.shape[0], dtype=dt, device=x.device) if dlogits is None
                       else dlogits.to(dt))
            need_x, need_a, need_w = ctx.needs_input_grad[:3]
            dx = da = dw = None
            if rng is None:
                dcat = torch.cat([dh, dlogits], dim=1)
                if need_a or need_w:
                    dwcat = torch.mm(dcat.t(), x)
                    da, dw = dwcat[: a_cat.shape[0]], dwcat[a_cat.shape[0]:]
                if need_x:
                    dx = torch.mm(dcat, wcat)
            else:
                scale = _replay_dropout_scale(x, ctx.p, rng)
                if need_a:
                    da = torch.mm(dh.t(), x * scale)
                if need_w:
                    dw = torch.mm(dlogits.t(), x)
                if need_x:
                    dx = torch.mm(dlogits, w_cat).addcmul_(torch.mm(dh, a_cat), scale)
            return dx, (da if need_a else None), (dw if need_w else None), None


class GatedExpand(torch.autograd.Function):
    """out, probs, gates, idx = expand(h [T, E·r], logits [T, E], b_all [d_out, E·r], base [T, d_out] or None):
    route the logits, fold ``scaling * gates`` into h and project with B (the second half of
    :class:`torch_fused.DenseGatedMoLoRA`); backward returns dh, dlogits and dB."""

    @staticmethod
    def forward(ctx, h, logits, b_all, base, top_k: int, scaling: float, router: str,
                router_options: Optional[dict] = None, token_ids=None, routing_mask=None, training: bool = True):
        tokens, num_experts = logits.shape
        rank = h.shape[1] // num_experts
        routing = route(logits, top_k, router, router_options, token_ids, routing_mask, training)
        probs, gates, idx, gs, hgs, out = gate_and_expand(h, routing, b_all, scaling, base)
        ctx.save_for_backward(h, b_all, hgs, gs, probs, idx)
        return finish_forward(ctx, out, probs, gates, idx, rank, base is not None, router, top_k, scaling)

    @staticmethod
    def backward(ctx, dout, dprobs, _dgates, _didx):
        with torch.autocast(ctx.device_type, enabled=False):
            h, b_all, hgs, gs, probs, idx = ctx.saved_tensors
            num_experts, rank, has_base, router, top_k, scaling = ctx.meta
            tokens = h.shape[0]
            if dout is None:
                dout = torch.zeros(tokens, b_all.shape[0], dtype=h.dtype, device=h.device)
            dout = dout.to(h.dtype)
            db = torch.mm(dout.t(), hgs) if ctx.needs_input_grad[2] else None
            dbase = dout if (has_base and ctx.needs_input_grad[3]) else None
            dhgs = torch.mm(dout, b_all).view(tokens, num_experts, rank)
            dgates = torch.linalg.vecdot(dhgs, h.reshape(tokens, num_experts, rank)).float().mul_(scaling)
            dlogits = router.logits_grad(dgates, dprobs, probs, idx, top_k, gates=gs).to(h.dtype)
            dh = (dhgs * gs[:, :, None]).view(tokens, num_experts * rank)
            return dh, dlogits, db, dbase, None, None, None, None, None, None, None


def moe_lora_siblings(x2: torch.Tensor, members: Sequence[SiblingOperands], *, dropout: float = 0.0,
                      training: bool = False) -> list[tuple[torch.Tensor, Routing]]:
    """The dense-gated MoE-LoRA of every member on the same flat input ``x2`` [T, d_in], with one shared shrink.

    Weights are cast to ``x2``'s dtype (the caller has applied autocast's dtype to ``x2`` and turned autocast
    off, as ``moe_lora`` does). Returns ``[(out_i [T, d_out_i], Routing_i)]`` in member order; ``out_i`` is
    ``base_i + delta_i`` when the member has a ``base``.
    """
    dt = x2.dtype
    a_cat = torch.cat([m.a_all.to(dt) for m in members], dim=0)
    w_cat = torch.cat([m.router_weight.to(dt) for m in members], dim=0)
    p = float(dropout) if (dropout > 0.0 and training) else 0.0
    if p > 0.0 and _rng_state(x2.device) is None:
        raise ValueError(f"sibling shrink with dropout needs a device whose RNG can be replayed, not {x2.device}")
    h_all, l_all = GroupShrink.apply(x2, a_cat, w_cat, p)
    outs = []
    r0 = e0 = 0
    for m in members:
        r, e = m.a_all.shape[0], m.router_weight.shape[0]
        base = None if m.base is None else m.base.to(dt)
        out, probs, gates, idx = GatedExpand.apply(h_all[:, r0:r0 + r], l_all[:, e0:e0 + e], m.b_all.to(dt), base,
                                                   m.top_k, float(m.scaling), m.router, m.router_options,
                                                   m.token_ids, m.routing_mask, training)
        outs.append((out, Routing(gates=gates, probs=probs, topk_idx=idx)))
        r0, e0 = r0 + r, e0 + e
    return outs


__all__ = ["SiblingOperands", "GroupShrink", "GatedExpand", "moe_lora_siblings", "routing_stats"]
