"""The dense-gated MoE-LoRA op in Triton: fused forward and backward.

The math is that of :mod:`molora_kernels.torch_dense` (the reference; read it first)::

    h      = dropout(x) @ A_all.T                     # [T, ER]   ER = E·r, experts stacked
    logits = x @ W_router.T                           # [T, E]    the router sees x, never dropout(x)
    gates, probs, idx = route(logits, k, router)      # see molora_kernels.routing
    delta  = s * (h ⊙ expand(gates)) @ B_all.T        # [T, d_out], expand = repeat each gate r times

Kernels (one program = one block of tokens; all accumulation in fp32):

forward
  1. ``_shrink_route_kernel``  h = xd @ A_allᵀ and, in the same pass over x, logits = x @ W_gᵀ (the
     stacked [A_all; W_g] trick, as two register tiles), then the routing epilogue: softmax, top-k,
     renormalise -> gates, probs, idx. The logits never go to memory.
  2. ``_gate_expand_kernel``   delta = s · (h ⊙ expand(gates)) @ B_allᵀ (gate applied in the prologue).
backward (dY = dL/d delta)
  3. ``_bwd_gate_kernel``      dHG = s · dY @ B_all; dH = dHG ⊙ expand(gates);
                               dG[t, e] = Σ_{j ∈ e} dHG[t, j] · h[t, j];
                               dlogits = routing backward(dG + dgates, dprobs).
                               Writes the stacked [dH | dlogits] as one [T, ER + E] fp32 buffer.
  4. ``_dx_kernel``            dX = [dH | dlogits] @ [A_all; W_g] (with dropout: the two halves go to
                               d(dropout(x)) and dx separately; torch's dropout backward joins them).
  5. ``_wgrad_kernel``         deterministic weight gradients over tokens: every program reduces one
                               token split into an fp32 partial [M, N]; ``partials.sum(0)`` finishes.
                               [dA_all; dW_g] = [dH | dlogits]ᵀ @ x (one call without dropout),
                               dB_all = s · dYᵀ @ (h ⊙ expand(gates)).

Choices worth knowing:
- Dropout (training with p > 0) is applied in torch before the kernels (``F.dropout``; its backward
  applies the mask). The shrink kernel then reads x (router) and dropout(x) (experts) in one pass.
- The logits and h stay fp32 (the torch path rounds them to x.dtype first), so with bf16/fp16 inputs
  the results are slightly more accurate than the torch path, and top-k choices can differ from it on
  near-ties of the rounded logits.
- No atomics, no ``.item()``: the token-split count depends only on the shapes and the device, so
  results are reproducible run to run for a given autotune choice.
- Under the Triton interpreter (``TRITON_INTERPRET=1``) bf16 operands are upcast to fp32 inside the
  kernels (the interpreter's bf16 arithmetic is wrong) and autotuning has one config.

Over 400 lines because the forward and backward kernels, their launch code and the autograd Function
share block sizes, constexpr switches and the interpreter workarounds; ScatterMoE keeps its op in one file for
the same reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .routers import get_router
from .routing import Routing
from .triton_routing import (
    AUTOTUNE_PRUNE,
    HAS_TRITON,
    INTERPRET,
    _check_route_args,
    all_experts_idx,
    autotune_configs,
    compute_dtype,
    dot_precision,
    expert_block,
    is_triton_available,
    num_sms,
    route_bwd_rows,
    route_rows_and_store,
    tl,
    token_bucket,
    triton,
)

#: Largest tile over the stacked expert rank ER = E·r (bigger ER loops over tiles). Tests lower it.
MAX_BLOCK_R = 128
#: Token-split granularity of the weight-gradient reduction (a multiple of every BLOCK_T config).
SPLIT_STEP = 32 if INTERPRET else 128


def _rank_block(er: int) -> int:
    return min(max(16, triton.next_power_of_2(er)), max(16, MAX_BLOCK_R))


# --------------------------------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------------------------------

@triton.autotune(
    configs=autotune_configs(
        gpu=[
            dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
            dict(BLOCK_T=64, BLOCK_K=128, num_warps=4, num_stages=4),
            dict(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=3),
            dict(BLOCK_T=128, BLOCK_K=128, num_warps=8, num_stages=3),
            dict(BLOCK_T=32, BLOCK_K=128, num_warps=4, num_stages=4),
        ],
        interpreter=dict(BLOCK_T=32, BLOCK_K=32),
    ),
    key=["T_BUCKET", "D_IN", "ER", "E"],
    prune_configs_by=AUTOTUNE_PRUNE,
)
@triton.jit
def _shrink_route_kernel(
    x_ptr, xd_ptr, a_ptr, w_ptr, h_ptr, gates_ptr, probs_ptr, idx_ptr,
    T, T_BUCKET, D_IN, ER, E,
    stride_xt, stride_xk, stride_xdt, stride_xdk, stride_ar, stride_ak, stride_we, stride_wk,
    HAS_DROPOUT: tl.constexpr, TOP_K: tl.constexpr, SOFT: tl.constexpr,
    CDT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Shrink and route one [BLOCK_T tokens] x [BLOCK_R of the ER columns] tile.

    x, xd: [T, D_IN] (xd = dropout(x), read only when HAS_DROPOUT); a: [ER, D_IN]; w: [E, D_IN].
    Writes h [T, ER] fp32. The programs of column block 0 also route their tokens: gates, probs
    [T, E] fp32 and idx [T, TOP_K] int64 (contiguous).
    """
    pid_t = tl.program_id(0).to(tl.int64)  # int64 offsets: T·d may pass 2^31
    pid_r = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    r_offs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    e_offs = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    r_mask = r_offs < ER
    e_mask = e_offs < E
    routes = pid_r == 0  # one column block per token block computes the router
    w_mask = e_offs < tl.where(routes, E, 0)  # the other blocks skip the router's loads

    acc_h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < D_IN
        x = tl.load(x_ptr + rows[:, None] * stride_xt + k_offs[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
        if HAS_DROPOUT:
            xd = tl.load(xd_ptr + rows[:, None] * stride_xdt + k_offs[None, :] * stride_xdk,
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
        else:
            xd = x
        a_t = tl.load(a_ptr + r_offs[None, :] * stride_ar + k_offs[:, None] * stride_ak,
                      mask=r_mask[None, :] & k_mask[:, None], other=0.0).to(CDT)  # [BLOCK_K, BLOCK_R]
        w_t = tl.load(w_ptr + e_offs[None, :] * stride_we + k_offs[:, None] * stride_wk,
                      mask=w_mask[None, :] & k_mask[:, None], other=0.0).to(CDT)  # [BLOCK_K, BLOCK_E]
        acc_h = tl.dot(xd, a_t, acc_h, input_precision=PREC)
        acc_l = tl.dot(x, w_t, acc_l, input_precision=PREC)

    tl.store(h_ptr + rows[:, None] * ER + r_offs[None, :], acc_h, mask=row_mask[:, None] & r_mask[None, :])

    if routes:
        route_rows_and_store(acc_l, e_offs, e_mask, rows, row_mask, idx_ptr, probs_ptr, gates_ptr, E, TOP_K, SOFT,
                             BLOCK_E)


@triton.autotune(
    configs=autotune_configs(
        gpu=[
            dict(BLOCK_T=64, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_T=64, BLOCK_N=128, num_warps=4, num_stages=3),
            dict(BLOCK_T=128, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_T=128, BLOCK_N=128, num_warps=8, num_stages=3),
            dict(BLOCK_T=128, BLOCK_N=256, num_warps=8, num_stages=3),
        ],
        interpreter=dict(BLOCK_T=32, BLOCK_N=32),
    ),
    key=["T_BUCKET", "D_OUT", "ER"],
    prune_configs_by=AUTOTUNE_PRUNE,
)
@triton.jit
def _gate_expand_kernel(
    h_ptr, gates_ptr, b_ptr, out_ptr,
    T, T_BUCKET, D_OUT, ER, E, RANK, scaling,
    stride_bn, stride_br, stride_ot, stride_on,
    CDT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """delta = scaling · (h ⊙ expand(gates)) @ B_allᵀ for one [BLOCK_T, BLOCK_N] output tile.

    h: [T, ER] fp32; gates: [T, E] fp32 (both contiguous); b: [D_OUT, ER]; out: [T, D_OUT].
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64 offsets
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < T
    n_mask = n_offs < D_OUT

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, ER, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        r_mask = r_offs < ER
        hr_mask = row_mask[:, None] & r_mask[None, :]
        h = tl.load(h_ptr + rows[:, None] * ER + r_offs[None, :], mask=hr_mask, other=0.0)
        g = tl.load(gates_ptr + rows[:, None] * E + (r_offs // RANK)[None, :], mask=hr_mask, other=0.0)
        b_t = tl.load(b_ptr + n_offs[None, :] * stride_bn + r_offs[:, None] * stride_br,
                      mask=n_mask[None, :] & r_mask[:, None], other=0.0).to(CDT)  # [BLOCK_R, BLOCK_N]
        acc = tl.dot((h * g).to(CDT), b_t, acc, input_precision=PREC)

    tl.store(out_ptr + rows[:, None] * stride_ot + n_offs[None, :] * stride_on,
             (acc * scaling).to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------------

@triton.autotune(
    configs=autotune_configs(
        gpu=[
            dict(BLOCK_T=32, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_T=64, BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_T=64, BLOCK_N=128, num_warps=4, num_stages=4),
            dict(BLOCK_T=128, BLOCK_N=64, num_warps=8, num_stages=3),
        ],
        interpreter=dict(BLOCK_T=32, BLOCK_N=32),
    ),
    key=["T_BUCKET", "D_OUT", "ER", "E"],
    prune_configs_by=AUTOTUNE_PRUNE,
)
@triton.jit
def _bwd_gate_kernel(
    dy_ptr, b_ptr, h_ptr, gates_ptr, probs_ptr, d_gates_ptr, d_probs_ptr, dhl_ptr,
    T, T_BUCKET, D_OUT, ER, E, RANK, scaling,
    stride_dyt, stride_dyn, stride_bn, stride_br,
    HAS_DGATES: tl.constexpr, HAS_DPROBS: tl.constexpr, SOFT: tl.constexpr,
    CDT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Gradients at the gate for one block of tokens.

    dy: [T, D_OUT]; b: [D_OUT, ER]; h: [T, ER] fp32; gates, probs and the optional d_gates, d_probs:
    [T, E] fp32 (contiguous). Writes dhl [T, ER + E] fp32 (contiguous): columns [0, ER) hold
    dH = s·(dY @ B_all) ⊙ expand(gates), columns [ER, ER + E) hold d_logits.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64 offsets
    e_offs = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    e_mask = e_offs < E
    DHL = ER + E

    d_g = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for r0 in range(0, ER, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        r_mask = r_offs < ER
        hr_mask = row_mask[:, None] & r_mask[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, D_OUT, BLOCK_N):
            n_offs = n0 + tl.arange(0, BLOCK_N)
            n_mask = n_offs < D_OUT
            dy = tl.load(dy_ptr + rows[:, None] * stride_dyt + n_offs[None, :] * stride_dyn,
                         mask=row_mask[:, None] & n_mask[None, :], other=0.0).to(CDT)
            b = tl.load(b_ptr + n_offs[:, None] * stride_bn + r_offs[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(CDT)  # [BLOCK_N, BLOCK_R]
            acc = tl.dot(dy, b, acc, input_precision=PREC)
        d_hg = acc * scaling
        h = tl.load(h_ptr + rows[:, None] * ER + r_offs[None, :], mask=hr_mask, other=0.0)
        g = tl.load(gates_ptr + rows[:, None] * E + (r_offs // RANK)[None, :], mask=hr_mask, other=0.0)
        tl.store(dhl_ptr + rows[:, None] * DHL + r_offs[None, :], d_hg * g, mask=hr_mask)
        # Sum the r columns of each expert: a [BLOCK_R, BLOCK_E] one-hot matmul (exact in fp32).
        owner = ((r_offs // RANK)[:, None] == e_offs[None, :]) & r_mask[:, None]
        d_g = tl.dot(d_hg * h, owner.to(tl.float32), d_g, input_precision="ieee")

    mask = row_mask[:, None] & e_mask[None, :]
    off = rows[:, None] * E + e_offs[None, :]
    gates = tl.load(gates_ptr + off, mask=mask, other=0.0)
    probs = tl.load(probs_ptr + off, mask=mask, other=0.0)
    if HAS_DGATES:
        d_g += tl.load(d_gates_ptr + off, mask=mask, other=0.0)
    d_probs = tl.zeros_like(probs)
    if HAS_DPROBS:
        d_probs = tl.load(d_probs_ptr + off, mask=mask, other=0.0)
    d_logits = route_bwd_rows(d_g, d_probs, gates, probs, SOFT)
    tl.store(dhl_ptr + rows[:, None] * DHL + ER + e_offs[None, :], d_logits, mask=mask)


@triton.autotune(
    configs=autotune_configs(
        gpu=[
            dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
            dict(BLOCK_T=64, BLOCK_K=128, num_warps=4, num_stages=3),
            dict(BLOCK_T=128, BLOCK_K=64, num_warps=4, num_stages=3),
            dict(BLOCK_T=128, BLOCK_K=128, num_warps=8, num_stages=3),
            dict(BLOCK_T=128, BLOCK_K=256, num_warps=8, num_stages=3),
        ],
        interpreter=dict(BLOCK_T=32, BLOCK_K=32),
    ),
    key=["T_BUCKET", "D_IN", "ER", "E"],
    prune_configs_by=AUTOTUNE_PRUNE,
)
@triton.jit
def _dx_kernel(
    dhl_ptr, a_ptr, w_ptr, dx_ptr, dxd_ptr,
    T, T_BUCKET, D_IN, ER, E,
    stride_ar, stride_ak, stride_we, stride_wk,
    SPLIT: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dX = dH @ A_all + d_logits @ W_g for one [BLOCK_T, BLOCK_K] tile.

    dhl: [T, ER + E] fp32 contiguous; a: [ER, D_IN]; w: [E, D_IN]; dx, dxd: [T, D_IN] contiguous.
    SPLIT (dropout): dxd gets dH @ A_all (the gradient of dropout(x)), dx gets d_logits @ W_g.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64 offsets
    k_offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    e_offs = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    k_mask = k_offs < D_IN
    e_mask = e_offs < E
    DHL = ER + E

    acc_a = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, ER, BLOCK_R):
        r_offs = r0 + tl.arange(0, BLOCK_R)
        r_mask = r_offs < ER
        dh = tl.load(dhl_ptr + rows[:, None] * DHL + r_offs[None, :],
                     mask=row_mask[:, None] & r_mask[None, :], other=0.0).to(CDT)
        a = tl.load(a_ptr + r_offs[:, None] * stride_ar + k_offs[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
        acc_a = tl.dot(dh, a, acc_a, input_precision=PREC)
    dl = tl.load(dhl_ptr + rows[:, None] * DHL + ER + e_offs[None, :],
                 mask=row_mask[:, None] & e_mask[None, :], other=0.0).to(CDT)
    w = tl.load(w_ptr + e_offs[:, None] * stride_we + k_offs[None, :] * stride_wk,
                mask=e_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
    acc_w = tl.dot(dl, w, input_precision=PREC)

    out = rows[:, None] * D_IN + k_offs[None, :]
    mask = row_mask[:, None] & k_mask[None, :]
    if SPLIT:
        tl.store(dxd_ptr + out, acc_a.to(dxd_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + out, acc_w.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dx_ptr + out, (acc_a + acc_w).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=autotune_configs(
        gpu=[
            dict(BLOCK_M=32, BLOCK_N=64, BLOCK_T=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_T=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_T=64, num_warps=4, num_stages=4),
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_T=64, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_T=128, num_warps=8, num_stages=3),
        ],
        interpreter=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_T=32),
    ),
    key=["T_BUCKET", "M", "N"],
    prune_configs_by=AUTOTUNE_PRUNE,
)
@triton.jit
def _wgrad_kernel(
    g_ptr, x_ptr, gates_ptr, out_ptr,
    T, T_BUCKET, M, N, E, RANK, TOKENS_PER_SPLIT, scale,
    stride_gt, stride_gm, stride_xt, stride_xn, stride_os, stride_om, stride_on,
    GATE_X: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One fp32 partial sum over a token split: out[s] = scale · G[split]ᵀ @ X[split], [M, N].

    g: [T, M]; x: [T, N]; with GATE_X, x is multiplied by expand(gates) first (gates [T, E] fp32
    contiguous, column n belongs to expert n // RANK). Grid: (splits, M blocks, N blocks).
    """
    pid_s = tl.program_id(0)
    m_offs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_offs = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m_offs < M
    n_mask = n_offs < N
    t_start = pid_s * TOKENS_PER_SPLIT
    t_end = tl.minimum(t_start + TOKENS_PER_SPLIT, T)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        t_offs = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # T·d may pass 2^31
        t_mask = t_offs < t_end
        g_t = tl.load(g_ptr + m_offs[:, None] * stride_gm + t_offs[None, :] * stride_gt,
                      mask=m_mask[:, None] & t_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_T]
        x = tl.load(x_ptr + t_offs[:, None] * stride_xt + n_offs[None, :] * stride_xn,
                    mask=t_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_T, BLOCK_N]
        if GATE_X:
            x = x * tl.load(gates_ptr + t_offs[:, None] * E + (n_offs // RANK)[None, :],
                            mask=t_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(g_t.to(CDT), x.to(CDT), acc, input_precision=PREC)

    tl.store(out_ptr + pid_s * stride_os + m_offs[:, None] * stride_om + n_offs[None, :] * stride_on,
             acc * scale, mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def _token_splits(n_tokens: int, m: int, n: int, device: torch.device) -> tuple[int, int]:
    """(number of token splits, tokens per split) for a [m, n] reduction over ``n_tokens`` tokens.

    Enough splits to give every SM a few programs, never more than one per SPLIT_STEP tokens. It
    depends on the shapes and the device only, so the summation order is fixed.
    """
    steps = triton.cdiv(n_tokens, SPLIT_STEP)
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
    splits = max(1, min(steps, triton.cdiv(4 * num_sms(device), tiles)))
    per_split = triton.cdiv(steps, splits) * SPLIT_STEP
    return triton.cdiv(n_tokens, per_split), per_split


def _wgrad(g: torch.Tensor, x: torch.Tensor, *, scale: float = 1.0, gates: torch.Tensor | None = None,
           rank: int = 1, cdt, prec: str) -> torch.Tensor:
    """scale · gᵀ @ (x, or x ⊙ expand(gates)) reduced over tokens: [M, N] fp32, deterministic.

    g: [T, M], x: [T, N] (any strides). ``cdt``/``prec``: dtype and input precision of ``tl.dot``.
    """
    n_tokens, m = g.shape
    n = x.shape[1]
    splits, per_split = _token_splits(n_tokens, m, n, g.device)
    partial = torch.empty(splits, m, n, device=g.device, dtype=torch.float32)
    grid = lambda meta: (splits, triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _wgrad_kernel[grid](
        g, x, gates if gates is not None else g, partial,
        n_tokens, token_bucket(n_tokens), m, n, 1 if gates is None else gates.shape[1], rank, per_split, scale,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        GATE_X=gates is not None, CDT=cdt, PREC=prec,
    )
    return partial.sum(0) if splits > 1 else partial[0]


def _precision(x_dtype: torch.dtype):
    """(tl dtype fed to tl.dot, its input_precision) for activations of ``x_dtype``."""
    return compute_dtype(x_dtype), dot_precision(x_dtype)


class MoELoRAFunction(torch.autograd.Function):
    """(x, dropout(x) or None, A_all, B_all, W_g) -> (delta, gates, probs, topk_idx or None)."""

    @staticmethod
    def forward(ctx, x, xd, a_all, b_all, w_g, top_k: int, scaling: float, soft: bool):
        T, d_in = x.shape
        er, num_experts, d_out = a_all.shape[0], w_g.shape[0], b_all.shape[0]
        rank = er // num_experts
        dev = x.device
        cdt, prec = _precision(x.dtype)
        block_r, block_e = _rank_block(er), expert_block(num_experts, for_dot=True)

        h = torch.empty(T, er, device=dev, dtype=torch.float32)
        gates = torch.empty(T, num_experts, device=dev, dtype=torch.float32)
        probs = torch.empty_like(gates)
        idx = None if soft else torch.empty(T, top_k, device=dev, dtype=torch.int64)
        delta = torch.empty(T, d_out, device=dev, dtype=x.dtype)
        if T > 0:
            xs = x if xd is None else xd
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(er, block_r))  # noqa: E731
            _shrink_route_kernel[grid](
                x, xs, a_all, w_g, h, gates, probs, gates if idx is None else idx,
                T, token_bucket(T), d_in, er, num_experts,
                x.stride(0), x.stride(1), xs.stride(0), xs.stride(1),
                a_all.stride(0), a_all.stride(1), w_g.stride(0), w_g.stride(1),
                HAS_DROPOUT=xd is not None, TOP_K=top_k, SOFT=soft, CDT=cdt, PREC=prec,
                BLOCK_R=block_r, BLOCK_E=block_e,
            )
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(d_out, meta["BLOCK_N"]))  # noqa: E731
            _gate_expand_kernel[grid](
                h, gates, b_all, delta,
                T, token_bucket(T), d_out, er, num_experts, rank, float(scaling),
                b_all.stride(0), b_all.stride(1), delta.stride(0), delta.stride(1),
                CDT=cdt, PREC=prec, BLOCK_R=block_r,
            )
        ctx.save_for_backward(x, xd, a_all, b_all, w_g, h, gates, probs)
        ctx.set_materialize_grads(False)  # unused outputs send None: their kernel loads are skipped
        ctx.scaling, ctx.soft, ctx.rank = float(scaling), soft, rank
        if idx is not None:
            ctx.mark_non_differentiable(idx)
        return delta, gates, probs, idx

    @staticmethod
    def backward(ctx, d_delta, d_gates, d_probs, _d_idx):
        if d_delta is None and d_gates is None and d_probs is None:
            return (None,) * 8
        x, xd, a_all, b_all, w_g, h, gates, probs = ctx.saved_tensors
        T, d_in = x.shape
        er, num_experts, d_out = a_all.shape[0], w_g.shape[0], b_all.shape[0]
        dev = x.device
        cdt, prec = _precision(x.dtype)
        block_r, block_e = _rank_block(er), expert_block(num_experts, for_dot=True)
        need_x, need_xd, need_a, need_b, need_w = ctx.needs_input_grad[:5]
        if d_delta is None:  # only the routing was used downstream (e.g. the aux loss)
            d_delta = torch.zeros(T, d_out, device=dev, dtype=x.dtype)
        d_gates = None if d_gates is None else d_gates.float().contiguous()
        d_probs = None if d_probs is None else d_probs.float().contiguous()

        dx = dxd = da = db = dw = None
        if T == 0:
            zeros = lambda p: torch.zeros_like(p)  # noqa: E731
            return (zeros(x) if need_x else None, zeros(xd) if need_xd else None,
                    zeros(a_all) if need_a else None, zeros(b_all) if need_b else None,
                    zeros(w_g) if need_w else None, None, None, None)

        # 3. gradients at the gate: [dH | d_logits]
        dhl = torch.empty(T, er + num_experts, device=dev, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)  # noqa: E731
        _bwd_gate_kernel[grid](
            d_delta, b_all, h, gates, probs,
            gates if d_gates is None else d_gates, probs if d_probs is None else d_probs, dhl,
            T, token_bucket(T), d_out, er, num_experts, ctx.rank, ctx.scaling,
            d_delta.stride(0), d_delta.stride(1), b_all.stride(0), b_all.stride(1),
            HAS_DGATES=d_gates is not None, HAS_DPROBS=d_probs is not None, SOFT=ctx.soft,
            CDT=cdt, PREC=prec, BLOCK_R=block_r, BLOCK_E=block_e,
        )
        dh, dl = dhl[:, :er], dhl[:, er:]

        # 4. input gradients
        if need_x or need_xd:
            split = xd is not None
            dx = torch.empty(T, d_in, device=dev, dtype=x.dtype)
            dxd = torch.empty(T, d_in, device=dev, dtype=x.dtype) if split else dx
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(d_in, meta["BLOCK_K"]))  # noqa: E731
            _dx_kernel[grid](
                dhl, a_all, w_g, dx, dxd,
                T, token_bucket(T), d_in, er, num_experts,
                a_all.stride(0), a_all.stride(1), w_g.stride(0), w_g.stride(1),
                SPLIT=split, CDT=cdt, PREC=prec, BLOCK_R=block_r, BLOCK_E=block_e,
            )
            if not split:
                dxd = None

        # 5. weight gradients (fp32 partial sums over token splits, then a sum)
        if xd is None and need_a and need_w:
            daw = _wgrad(dhl, x, cdt=cdt, prec=prec)  # the stacked trick: [dA_all; dW_g] in one pass over x
            da, dw = daw[:er], daw[er:].clone()  # W_g gets its own storage
        else:
            if need_a:
                da = _wgrad(dh, x if xd is None else xd, cdt=cdt, prec=prec)
            if need_w:
                dw = _wgrad(dl, x, cdt=cdt, prec=prec)
        if need_b:
            db = _wgrad(d_delta, h, scale=ctx.scaling, gates=gates, rank=ctx.rank, cdt=cdt, prec=prec)

        cast = lambda g, p: None if g is None else g.to(p.dtype)  # noqa: E731
        return (dx if need_x else None, dxd if need_xd else None,
                cast(da, a_all), cast(db, b_all), cast(dw, w_g), None, None, None)


def moe_lora_triton(
    x2: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    router_weight: torch.Tensor,
    *,
    top_k: int,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    router: str = "topk",
) -> tuple[torch.Tensor, Routing]:
    """Dense-gated mixture of E LoRA experts on T tokens with the Triton kernels.

    Same math and arguments as the torch path of :func:`molora_kernels.ops.moe_lora` (no statistics:
    compute them from the returned Routing with :func:`molora_kernels.routing.routing_stats`).

    Args:
        x2: [T, d_in] activations (fp32, bf16 or fp16), 2-D.
        a_all: [E·r, d_in]; b_all: [d_out, E·r]; router_weight: [E, d_in] (any float dtype; read
            in x's dtype; their gradients come back in their own dtypes).
        top_k, scaling, router: as in ``moe_lora``.
        dropout, training: LoRA dropout on the experts' input, applied here in torch
            (``F.dropout``) before the kernels; the router always sees x.
    Returns:
        (delta [T, d_out] in x2.dtype, Routing with gates/probs [T, E] fp32 that carry gradients to the
        router through the logits, topk_idx [T, k] int64).
    """
    if x2.dim() != 2:
        raise ValueError(f"x2 must be 2-D [T, d_in], got shape {tuple(x2.shape)}")
    num_experts, d_in = router_weight.shape
    if x2.shape[1] != d_in:
        raise ValueError(f"x has {x2.shape[1]} features but the router expects d_in={d_in}")
    if a_all.shape[0] % num_experts or a_all.shape[1] != d_in:
        raise ValueError(f"a_all {tuple(a_all.shape)} must be [E·r, d_in] with E={num_experts}, d_in={d_in}")
    if b_all.shape[1] != a_all.shape[0]:
        raise ValueError(f"b_all {tuple(b_all.shape)} must be [d_out, E·r={a_all.shape[0]}]")
    _check_route_args(num_experts, top_k, router)
    if not HAS_TRITON:
        raise RuntimeError("moe_lora_triton needs triton (pip install triton)")
    soft = get_router(router).gates_are_probs(top_k, num_experts)
    xd = F.dropout(x2, p=dropout, training=True) if dropout > 0.0 and training else None
    delta, gates, probs, idx = MoELoRAFunction.apply(x2, xd, a_all, b_all, router_weight, top_k, scaling, soft)
    if idx is None:
        idx = all_experts_idx(x2.shape[0], num_experts, x2.device)
    return delta, Routing(gates=gates, probs=probs, topk_idx=idx)


__all__ = ["HAS_TRITON", "INTERPRET", "is_triton_available", "moe_lora_triton", "MoELoRAFunction"]
