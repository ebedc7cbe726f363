"""The dense-gated MoE-LoRA op as one autograd Function: the fast CPU path (backend ``"torch"``).

Same math as :mod:`torch_dense` (the reference), computed in as few passes and GEMMs as the formula
allows. With ``E`` experts of rank ``r`` (``R = E·r``), ``s = alpha / r``::

    forward   [h | logits] = x @ [A_all; W_g].T          one GEMM, N = R + E      (no dropout)
              probs, gates = route(logits)               fp32, [T, E]
              hgs          = h ⊙ (s · gates)[:, :, None] viewed [T, E, r]  (no repeat_interleave)
              out          = hgs @ B_all.T  (or base + hgs @ B_all.T in one addmm)

    backward  dB_all   = dy.T @ hgs                                       GEMM
              dhgs     = dy @ B_all                                       GEMM [T, R]
              dgates   = s · sum_r dhgs ⊙ h                               [T, E]   (r-wide reduction)
              dlogits  = softmax/top-k/renorm backward of (dgates, dprobs) [T, E]   fp32
              dcat     = [dhgs ⊙ (s · gates) | dlogits]                   [T, R + E]
              [dA_all; dW_g] = dcat.T @ x                                 one GEMM
              dx       = dcat @ [A_all; W_g]                              one GEMM

With dropout in training the expert input is ``xd = dropout(x)`` and the router keeps ``x``: the shrink
and the router then take separate GEMMs, and so do their gradients. The mask is drawn inside the
Function from the global RNG exactly as ``F.dropout(x)`` draws it (same stream position, same values:
``xd = x * m`` with ``m = F.dropout(ones)`` in {0, 1/(1-p)}, which is what ``F.dropout`` computes), so
outputs equal the reference's bit for bit. Only the RNG state before the draw is saved, not ``xd``
([T, d_in] per module: a quarter of SmolLM2-135M's activation memory with seven adapted projections);
backward redraws ``m`` from that state inside ``torch.random.fork_rng`` (the run's RNG stream is not
moved) — a few elementwise passes instead of T·d_in saved floats. Measured on CPU (T=2048, d=1024, E=8,
r=8, fwd+bwd of the op alone, p=0.05): 1.32x the time of saving dropout(x); the frozen GEMM around it is not
in that figure. Forward draws with ``F.dropout(x)`` itself (one pass).

The scaling is folded into the [T, E] gate (never a pass over [T, d_out]); the output can be
accumulated into the frozen layer's output by ``addmm`` (``base=``), which saves the add pass.
Saved for backward: x (and the RNG state of the dropout draw), the [T, R + E] shrink/logit activations,
hgs, probs, top-k indices.
"""
from __future__ import annotations

from typing import Optional

import torch

from .routers import get_router
from .routing import Routing, route


def _rng_state(device: torch.device) -> Optional[torch.Tensor]:
    """The generator state a dropout draw on ``device`` consumes (None: a device we cannot replay on)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return None


def _dropout_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """``m`` with ``F.dropout(x, p) == x * m`` (m in {0, 1/(1-p)}), drawn like ``F.dropout(x, p)`` would be."""
    return torch.nn.functional.dropout(torch.ones_like(x), p=p, training=True)


def _replay_dropout_scale(x: torch.Tensor, p: float, state: torch.Tensor) -> torch.Tensor:
    """The dropout scale drawn from ``state`` again, without moving the run's RNG stream."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type if devices else "cuda"):
        if x.device.type == "cuda":
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return _dropout_scale(x, p)


def gate_and_expand(h: torch.Tensor, routing, b_all: torch.Tensor, scaling: float,
                    base: Optional[torch.Tensor]) -> tuple:
    """The forward after routing, shared with the sibling op (:mod:`.siblings`): gates scaled by ``scaling``
    (multiplied in at least fp32: a float64 model keeps float64, alpha / r is rarely exact in fp32), folded into
    h [T, E·r] as a [T, E, r] view, then one expand GEMM (into ``base`` [T, d_out] when given).

    Returns (probs, gates, idx, gs [T, E] in h.dtype, hgs [T, E·r], out [T, d_out]); ``gates`` is a copy when the
    router returned the probs themselves (soft router / E == k), so probs keeps its own gradient."""
    probs, gates, idx = routing.probs, routing.gates, routing.topk_idx
    if gates is probs:
        gates = probs.clone()
    tokens, num_experts = gates.shape
    gs = (gates.to(torch.promote_types(h.dtype, torch.float32)) * scaling).to(h.dtype)
    hgs = (h.reshape(tokens, num_experts, h.shape[1] // num_experts) * gs[:, :, None]).view(tokens, h.shape[1])
    out = torch.mm(hgs, b_all.t()) if base is None else torch.addmm(base, hgs, b_all.t())
    return probs, gates, idx, gs, hgs, out


def finish_forward(ctx, out, probs, gates, idx, rank: int, has_base: bool, router: str, top_k: int, scaling: float):
    """What the fused forward and the sibling op keep for their backward besides the saved tensors (the router
    object, sizes, device type); marks gates and indices non-differentiable. Returns their outputs."""
    ctx.meta = (gates.shape[1], rank, has_base, get_router(router), top_k, scaling)
    ctx.device_type = out.device.type
    ctx.mark_non_differentiable(gates, idx)
    return out, probs, gates, idx


class DenseGatedMoLoRA(torch.autograd.Function):
    """out, probs, gates, topk_idx = f(x, xd, a_all, b_all, router_weight, base, ..., dropout).

    x: [T, d_in]; xd: dropout(x) drawn by the caller, or None (then, with ``dropout > 0``, the Function
    draws it itself and replays the draw in backward instead of saving it; with ``dropout == 0`` the
    shrink reads x); a_all: [R, d_in];
    b_all: [d_out, R]; router_weight: [E, d_in] (all in x.dtype); base: [T, d_out] or None.
    Returns out = (base +) delta [T, d_out], probs [T, E] fp32 (differentiable), gates [T, E] fp32
    and topk_idx [T, k] (not differentiable: the gates' gradient reaches the router internally).
    """

    @staticmethod
    def forward(ctx, x, xd, a_all, b_all, router_weight, base, top_k: int, scaling: float, router: str,
                dropout: float = 0.0, router_options: Optional[dict] = None, token_ids=None, routing_mask=None,
                training: bool = True):
        num_experts = router_weight.shape[0]
        rank_all = a_all.shape[0]
        rank = rank_all // num_experts
        rng = None
        if xd is None and dropout > 0.0:
            rng = _rng_state(x.device)
            xd = torch.nn.functional.dropout(x, p=dropout, training=True)  # one pass; == x * replayed scale
        if xd is None:
            wcat = torch.cat([a_all, router_weight], dim=0)
            hl = torch.mm(x, wcat.t())                      # [T, R + E]
            h, logits = hl[:, :rank_all], hl[:, rank_all:]
        else:
            wcat = None
            h = torch.mm(xd, a_all.t())
            logits = torch.mm(x, router_weight.t())
            hl = h
        routing = route(logits, top_k, router, router_options, token_ids, routing_mask, training)
        probs, gates, idx, gs, hgs, out = gate_and_expand(h, routing, b_all, scaling, base)
        replay = rng is not None
        ctx.save_for_backward(x, None if replay else xd, a_all, b_all, router_weight, wcat, hl, hgs, gs, probs, idx,
                              rng)
        ctx.dropout = dropout if replay else 0.0
        return finish_forward(ctx, out, probs, gates, idx, rank, base is not None, router, top_k, scaling)

    @staticmethod
    def backward(ctx, dout, dprobs, _dgates, _didx):
        # backward() may be called inside an autocast region: keep the dtypes the forward saved.
        with torch.autocast(ctx.device_type, enabled=False):
            return DenseGatedMoLoRA._backward(ctx, dout, dprobs)

    @staticmethod
    def _backward(ctx, dout, dprobs):
        x, xd, a_all, b_all, router_weight, wcat, hl, hgs, gs, probs, idx, rng = ctx.saved_tensors
        num_experts, rank, has_base, router, top_k, scaling = ctx.meta
        need_x, need_xd, need_a, need_b, need_w, need_base = ctx.needs_input_grad[:6]
        scale = None
        if rng is not None:  # the dropout was drawn here: replay it (x's gradient also flows through it)
            scale = _replay_dropout_scale(x, ctx.dropout, rng)
            xd = x * scale
            need_xd = need_x
        tokens = x.shape[0]
        rank_all = num_experts * rank
        dx = dxd = da = db = dw = None
        dbase = dout if (has_base and need_base) else None
        if dout is None:
            dout = torch.zeros(tokens, b_all.shape[0], dtype=x.dtype, device=x.device)
        if dout.dtype != x.dtype:
            dout = dout.to(x.dtype)
        if need_b:
            db = torch.mm(dout.t(), hgs)                                    # [d_out, R]
        need_in = need_x or need_xd or need_a or need_w
        if not need_in:
            return dx, dxd, da, db, dw, dbase, None, None, None, None, None, None, None, None
        dhgs = torch.mm(dout, b_all).view(tokens, num_experts, rank)       # d loss / d hgs
        h = hl[:, :rank_all].view(tokens, num_experts, rank)
        dgates = torch.linalg.vecdot(dhgs, h).float().mul_(scaling)      # [T, E] (real dtypes: no conj)
        dlogits = router.logits_grad(dgates, dprobs, probs, idx, top_k, gates=gs).to(x.dtype)
        if xd is None:
            # Shrink and router share one GEMM forward and one per gradient.
            # (one cat rather than writes into views of an empty buffer: torch.compile traces no out= into views)
            dcat = torch.cat([(dhgs * gs[:, :, None]).view(tokens, rank_all), dlogits], dim=1)
            if need_a or need_w:
                dwcat = torch.mm(dcat.t(), x)
                da = dwcat[:rank_all] if need_a else None
                dw = dwcat[rank_all:] if need_w else None
            if need_x:
                dx = torch.mm(dcat, wcat)
        else:
            dh = (dhgs * gs[:, :, None]).view(tokens, rank_all)
            if need_a:
                da = torch.mm(dh.t(), xd)
            if need_w:
                dw = torch.mm(dlogits.t(), x)
            if need_xd:
                dxd = torch.mm(dh, a_all)
            if need_x:
                dx = torch.mm(dlogits, router_weight)
            if scale is not None:  # replayed dropout: d xd / d x = scale, and xd was no input of its own
                if need_x:
                    dx = dx.addcmul_(dxd, scale)
                dxd = None
        return dx, dxd, da, db, dw, dbase, None, None, None, None, None, None, None, None


def moe_lora_fused(x2: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, router_weight: torch.Tensor, *,
                   top_k: int, scaling: float, dropout: float = 0.0, training: bool = False,
                   router: str = "topk", base: Optional[torch.Tensor] = None,
                   router_options: Optional[dict] = None,
                   token_ids: Optional[torch.Tensor] = None,
                   routing_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Routing]:
    """Dense-gated MoE-LoRA on flat tokens ``x2`` [T, d_in].

    Returns (out [T, d_out] in x2.dtype, Routing). ``out`` is the delta, or ``base + delta`` when
    ``base`` [T, d_out] is given (one addmm instead of a GEMM and an add).
    """
    p = float(dropout) if (dropout > 0.0 and training) else 0.0
    a, b, w, xd, base = prepare_operands(x2, a_all, b_all, router_weight, 0.0, False, base)
    # a device we cannot replay a draw on, or a torch.compile trace (no RNG state juggling in a graph): draw
    # outside and save xd
    if p > 0.0 and (torch.compiler.is_compiling() or _rng_state(x2.device) is None):
        xd = torch.nn.functional.dropout(x2, p=p, training=True)
        p = 0.0
    out, probs, gates, idx = DenseGatedMoLoRA.apply(x2, xd, a, b, w, base, top_k, float(scaling), router, p,
                                                    router_options, token_ids, routing_mask, training)
    return out, Routing(gates=gates, probs=probs, topk_idx=idx)


def prepare_operands(x2, a_all, b_all, router_weight, dropout: float, training: bool, base):
    """Cast the adapter weights (and ``base``) to x2's dtype and draw the LoRA dropout of the expert input.

    Returns (a, b, w, xd, base) where ``xd`` is dropout(x2) or None when there is no dropout (eval, p = 0).
    The dropout is drawn outside the autograd Functions with ``F.dropout`` so the mask equals the reference's.
    """
    dt = x2.dtype
    xd = torch.nn.functional.dropout(x2, p=dropout, training=True) if (dropout > 0.0 and training) else None
    if base is not None and base.dtype != dt:
        base = base.to(dt)
    return a_all.to(dt), b_all.to(dt), router_weight.to(dt), xd, base
