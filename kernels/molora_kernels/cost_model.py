"""Which MoE-LoRA backend to run: a small roofline model of the two torch paths.

With R = E·r stacked ranks, per token and per pass (forward, or each of the two backward halves):

* dense-gated ("torch") multiplies every token by all E experts: GEMMs of width R (+E for the
  router) over d_in and d_out, each a large well-shaped GEMM, plus O(R) elementwise work;
* sparse ("sparse") only computes the k chosen experts (width k·r) but pays for it with a gather of
  x (k·d_in per token), an index_add of the outputs (k·d_out), the same again in the backward, and
  E small GEMMs per grouped GEMM (T·k/E rows each), which run far below the peak on CPU.

Each GEMM costs ``max(flops / peak, bytes / bandwidth) + per-call overhead``, at an efficiency
``cols / (cols + half_cols)`` for its narrow side (and ``rows / (rows + half_rows)`` for the per-expert
GEMMs); gathers and scatters cost their bytes over ``gather_bandwidth``. The CPU constants were fitted
to 32 measurements of the adapter alone on the project's shared 2-core CPU (fp32, fwd and fwd+bwd;
sparse path with its per-expert GEMMs single-threaded, see ``sparse.CPU_EXPERT_THREADS``); the model
then picks the faster path at all 32 points. Measured there (T=2048, d=2048, fwd+bwd, sparse / dense):
E,k,r = 8,2,8: 1.86 · 8,2,16: 1.36 · 16,2,16: 0.64 · 32,4,16: 0.74 · 8,2,64: 0.70 · 64,2,16: 0.31 ·
64,2,64: 0.13 — so MoLA's usual sizes (E <= 8, r = 8) stay dense-gated and the sparse path takes over
from E·r of a few hundred with E/k >= 4. The GPU constants are datasheet-level guesses (no GPU here);
there the dense-gated formula wins longer (gathers cost more relative to GEMMs), and where it does the
Triton kernels (the same formula, fused) replace "torch" when they are available. Only the *ratio*
of the two estimates matters, so a uniformly faster or slower machine picks the same backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceConstants:
    peak_flops: float          # sustained FLOP/s of a large GEMM
    bandwidth: float           # bytes/s of streaming GEMM operands / elementwise passes
    gather_bandwidth: float    # bytes/s of index_select / index_add rows
    call_overhead: float       # seconds per op (dispatch + thread sync)
    half_rows: float           # per-expert GEMM rows at which it reaches half the peak
    half_cols: float           # GEMM width (rank) at which it reaches half the peak
    launch_per_group: bool     # one op per expert (CPU loop) or one per grouped GEMM (grouped_mm)


# Fitted (least squares on log times, decisions weighted) to 32 measurements of the adapter alone
# (fwd and fwd+bwd, T 512..8192, d 1024..4096, E·r 64..4096) on the shared 2-core CPU, fp32.
# half_cols ~ 64: GEMMs as skinny as a rank-8 LoRA run far below the peak there.
CPU = DeviceConstants(peak_flops=2.9e10, bandwidth=1.7e10, gather_bandwidth=3.4e9, call_overhead=1e-5,
                      half_rows=8.0, half_cols=64.0, launch_per_group=True)
# Not measured here (no GPU): datasheet-level numbers of a recent data-center GPU in bf16.
GPU = DeviceConstants(peak_flops=1.5e14, bandwidth=1.5e12, gather_bandwidth=6e11, call_overhead=8e-6,
                      half_rows=128.0, half_cols=16.0, launch_per_group=False)


def constants_for(device: torch.device | str) -> DeviceConstants:
    return GPU if torch.device(device).type == "cuda" else CPU


def _gemm(c: DeviceConstants, m: float, k: float, n: float, elem: int, eff: float = 1.0) -> float:
    if m <= 0 or n <= 0 or k <= 0:
        return c.call_overhead
    flops = 2.0 * m * k * n / (c.peak_flops * eff)
    mem = elem * (m * k + k * n + m * n) / c.bandwidth
    return max(flops, mem) + c.call_overhead


def _eff(c: DeviceConstants, rows: float, cols: float) -> float:
    return (rows / (rows + c.half_rows)) * (cols / (cols + c.half_cols))


def estimate_dense(*, tokens: int, d_in: int, d_out: int, num_experts: int, top_k: int, rank: int,
                   elem: int = 4, backward: bool = True, device: torch.device | str = "cpu") -> float:
    """Seconds for the dense-gated adapter (without the frozen matmul)."""
    c = constants_for(device)
    t, big = float(tokens), float(num_experts * rank)
    e = float(num_experts)
    eff = big / (big + c.half_cols)   # width-R GEMMs: R is 16..hundreds, near peak
    cost = _gemm(c, t, d_in, big + e, elem, eff) + _gemm(c, t, big, d_out, elem, eff)
    cost += 3 * elem * t * big / c.bandwidth + 12 * c.call_overhead          # gate, routing
    if backward:
        cost += (_gemm(c, d_out, t, big, elem, eff) + _gemm(c, t, d_out, big, elem, eff)
                 + _gemm(c, big + e, t, d_in, elem, eff) + _gemm(c, t, big + e, d_in, elem, eff))
        cost += 4 * elem * t * big / c.bandwidth + 20 * c.call_overhead
    return cost


def estimate_sparse(*, tokens: int, d_in: int, d_out: int, num_experts: int, top_k: int, rank: int,
                    elem: int = 4, backward: bool = True, device: torch.device | str = "cpu") -> float:
    """Seconds for the sorted/grouped adapter (without the frozen matmul)."""
    c = constants_for(device)
    t, e, n = float(tokens), float(num_experts), float(tokens * top_k)
    rows = n / e
    eff = _eff(c, rows, rank)

    launch = 0.0 if c.launch_per_group else (e - 1) * c.call_overhead   # one launch, not E

    def grouped(k_dim: float, n_dim: float) -> float:   # E per-expert GEMMs of rows x k_dim x n_dim
        return e * _gemm(c, rows, k_dim, n_dim, elem, eff) - launch

    def wgrad(m_dim: float, n_dim: float) -> float:     # E per-expert weight gradients, K = rows
        return e * _gemm(c, m_dim, rows, n_dim, elem, eff) - launch

    cost = _gemm(c, t, d_in, e, elem, e / (e + c.half_cols))                  # router
    cost += grouped(d_in, rank) + grouped(rank, d_out)
    cost += elem * n * (2 * d_in + 3 * d_out) / c.gather_bandwidth             # gather x, index_add y
    cost += 15 * c.call_overhead + 4 * elem * n / c.bandwidth
    if backward:
        cost += 2 * _gemm(c, t, e, d_in, elem, e / (e + c.half_cols))          # router grads
        cost += wgrad(rank, d_out) + grouped(d_out, rank) + wgrad(rank, d_in) + grouped(rank, d_in)
        cost += elem * n * (2 * d_out + 2 * d_in + 3 * d_in) / c.gather_bandwidth  # gather dy, x; index_add dx
        cost += 25 * c.call_overhead
    return cost


def choose_backend(*, tokens: int, d_in: int, d_out: int, num_experts: int, top_k: int, rank: int,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   backward: bool = True, triton: bool = False) -> str:
    """"torch" (dense-gated), "sparse" or "triton" (dense-gated, fused) for one call.

    Args:
        tokens, d_in, d_out, num_experts, top_k, rank: the sizes of the call (top_k = E for a soft router).
        device, dtype: where and in what it runs.
        backward: whether a backward pass will follow (training) — it changes the balance.
        triton: the Triton kernels are available on this device; they replace "torch" wherever the
            dense-gated formula is the cheaper one (they compute the same formula, fused).
    """
    dense = "triton" if triton else "torch"
    if top_k >= num_experts or tokens == 0:
        return dense   # nothing to skip: sparse would only add gathers
    elem = torch.empty((), dtype=dtype).element_size()
    kw = dict(tokens=tokens, d_in=d_in, d_out=d_out, num_experts=num_experts, top_k=top_k, rank=rank,
              elem=elem, backward=backward, device=device)
    return "sparse" if estimate_sparse(**kw) < estimate_dense(**kw) else dense
