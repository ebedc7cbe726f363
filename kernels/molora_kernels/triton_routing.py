"""Routing in Triton: softmax, top-k, renormalisation and the dense gate matrix in one pass.

Same semantics as :func:`molora_kernels.routing.route` (read its docstring for the math); this module
adds the kernels, the autograd Function, and the small pieces of Triton plumbing that the MoE-LoRA
kernels (:mod:`molora_kernels.triton_moe_lora`) share: the availability check, the interpreter flag,
dtype mapping and autotune configuration helpers.

Forward, for a block of BLOCK_T rows held in registers (E padded to BLOCK_E)::

    p      = softmax(float32(logits))       # padded experts get 0
    repeat k times: take the largest remaining p (lowest index on ties), write its index to topk_idx
    gates  = where(chosen, p, 0) / sum(chosen p)

Backward (gates and probs both carry gradients; the probs carry the aux-loss gradient)::

    S       = sum_{chosen} p                             # per token
    dp      = dprobs + chosen * (dgates - sum_e gates_e * dgates_e) / S
    dlogits = p * (dp - sum_e p_e * dp_e)                # softmax backward

The soft router (and top-k with k == E, where renormalisation is the identity) uses
``gates = probs`` and ``dp = dprobs + dgates``.

Testing without a GPU: set ``TRITON_INTERPRET=1`` before triton is imported; the kernels then run on
CPU tensors. The interpreter is decided when this module is imported (that is when ``@triton.jit``
looks at the environment), and :func:`is_triton_available` reports it.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from .routers import get_router
from .routing import Routing

try:  # Triton is optional: importing this module must work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing or broken
    from types import SimpleNamespace

    HAS_TRITON = False
    # Just enough of triton for the kernel definitions below to be evaluated (and never launched).
    triton = SimpleNamespace(
        jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f),
        autotune=lambda *_, **__: (lambda fn: fn),
        Config=lambda *_, **__: None,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, int(n) - 1).bit_length(),
    )
    tl = SimpleNamespace(constexpr=None)

#: True when the kernels of this package were built for the Triton interpreter (CPU tensors).
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_triton_available(device: torch.device | str | None = "cuda") -> bool:
    """Whether the Triton kernels can run on ``device``.

    True only when triton imports and either ``device`` is a CUDA device (with CUDA present) or the
    kernels were built under the interpreter (``TRITON_INTERPRET=1`` set before this package was
    imported), which runs them on CPU tensors.
    """
    if not HAS_TRITON:
        return False
    if INTERPRET:
        return True
    dev = torch.device(device) if device is not None else torch.device("cuda")
    return dev.type == "cuda" and torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# Shared plumbing for the kernels of this package
# --------------------------------------------------------------------------------------------------

def compute_dtype(dtype: torch.dtype):
    """The dtype the kernels feed to ``tl.dot`` for inputs of ``dtype`` (accumulation is always fp32).

    On GPUs that is the input dtype. The interpreter computes bf16 arithmetic wrongly (silently), so
    under it bf16 operands are upcast to fp32 inside the kernels; fp16 and fp32 run as they would on GPU.
    """
    if dtype == torch.bfloat16 and not INTERPRET:
        return tl.bfloat16
    if dtype == torch.float16:
        return tl.float16
    return tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for fp32 ``tl.dot``: follow torch's TF32 switch for matmuls (off by default)."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def token_bucket(n_tokens: int) -> int:
    """Autotune key for a token count: the next power of two (>= 16), so sequence lengths share tunings."""
    return max(16, triton.next_power_of_2(max(1, n_tokens)))


#: one config per kernel instead of the search (``MOLORA_TRITON_AUTOTUNE=0``, or :func:`single_config`): each config
#: of each kernel compiles once per autotune key, which costs minutes on a fresh GPU machine; a correctness check does
#: not need the fastest config
_SINGLE_CONFIG = {"on": os.environ.get("MOLORA_TRITON_AUTOTUNE", "1") == "0"}


def _prune_configs(configs, named_args, **kwargs):
    return list(configs)[:1] if _SINGLE_CONFIG["on"] else configs


#: ``prune_configs_by`` of every molora autotuned kernel
AUTOTUNE_PRUNE = {"early_config_prune": _prune_configs}


@contextlib.contextmanager
def single_config(on: bool = True):
    """Within the block, kernels autotuned for a new key use their first config only (keys tuned before keep their
    choice; Triton caches it per key)."""
    before = _SINGLE_CONFIG["on"]
    _SINGLE_CONFIG["on"] = on
    try:
        yield
    finally:
        _SINGLE_CONFIG["on"] = before


def autotune_configs(gpu: list[dict], interpreter: dict) -> list:
    """``triton.Config`` list: the GPU (Hopper-class) search space, or the single interpreter config.

    Each dict holds the tuned meta-parameters plus ``num_warps`` and ``num_stages``. The interpreter
    cannot autotune over several configs, so it gets exactly one (small blocks: it runs on numpy).
    """
    def make(d):
        d = dict(d)
        warps, stages = d.pop("num_warps", 4), d.pop("num_stages", 3)
        return triton.Config(d, num_warps=warps, num_stages=stages)

    return [make(interpreter)] if INTERPRET else [make(d) for d in gpu]


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small constant under the interpreter)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _check_route_args(num_experts: int, top_k: int, router: str) -> None:
    r = get_router(router)  # ValueError naming the registered routers
    if "triton" not in r.backends:
        raise ValueError(f"router {router!r} has no Triton kernel; backends for it: {', '.join(r.backends)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")


def expert_block(num_experts: int, for_dot: bool = False) -> int:
    """Padded expert dimension of a register tile (``tl.dot`` needs >= 16)."""
    return max(16 if for_dot else 2, triton.next_power_of_2(num_experts))


# --------------------------------------------------------------------------------------------------
# Row-wise routing math (shared with the fused MoE-LoRA kernels)
# --------------------------------------------------------------------------------------------------

@triton.jit
def softmax_rows(logits, e_mask):
    """fp32 softmax over the valid experts of each row. logits: [BLOCK_T, BLOCK_E]; e_mask: [BLOCK_E]."""
    z = tl.where(e_mask[None, :], logits, float("-inf"))
    z = z - tl.max(z, axis=1)[:, None]
    num = tl.exp(z)  # padded experts: exp(-inf) = 0
    return num / tl.sum(num, axis=1)[:, None]


@triton.jit
def topk_gates_rows(probs, e_offs, e_mask, rows, row_mask, idx_ptr, stride_idx_t,
                    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """Top-k of each row of ``probs`` [BLOCK_T, BLOCK_E], renormalised; zeros elsewhere.

    Writes the chosen experts (descending probability, lowest index on ties) to
    ``idx_ptr[row * stride_idx_t + j]`` (int64) and returns the gates [BLOCK_T, BLOCK_E] fp32.
    """
    remaining = tl.where(e_mask[None, :], probs, -1.0)  # padded experts are never chosen
    kept = tl.zeros_like(probs)
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)
        arg = tl.min(tl.where(remaining == best[:, None], e_offs[None, :], BLOCK_E), axis=1)
        hit = e_offs[None, :] == arg[:, None]
        kept = tl.where(hit, probs, kept)
        remaining = tl.where(hit, -2.0, remaining)
        tl.store(idx_ptr + rows * stride_idx_t + j, arg.to(tl.int64), mask=row_mask)
    return kept / tl.sum(kept, axis=1)[:, None]


@triton.jit
def route_rows_and_store(logits, e_offs, e_mask, rows, row_mask, idx_ptr, probs_ptr, gates_ptr, E,
                         TOP_K: tl.constexpr, SOFT: tl.constexpr, BLOCK_E: tl.constexpr):
    """The routing step of a block of rows, shared by the routing kernel and the fused forward: fp32 softmax of
    ``logits`` [BLOCK_T, BLOCK_E], the renormalised top-k gates (the probs themselves for the soft router; top-k
    indices to ``idx_ptr``), both stored [T, E] row-major."""
    probs = softmax_rows(logits, e_mask)
    if SOFT:
        gates = probs
    else:
        gates = topk_gates_rows(probs, e_offs, e_mask, rows, row_mask, idx_ptr, TOP_K, TOP_K, BLOCK_E)
    out = rows[:, None] * E + e_offs[None, :]
    mask = row_mask[:, None] & e_mask[None, :]
    tl.store(probs_ptr + out, probs, mask=mask)
    tl.store(gates_ptr + out, gates, mask=mask)


@triton.jit
def route_bwd_rows(d_gates, d_probs, gates, probs, SOFT: tl.constexpr):
    """Gradient to the logits [BLOCK_T, BLOCK_E] fp32 from those of the gates and of the probs.

    The chosen experts are those with a non-zero gate (an expert chosen with p == 0 contributes
    nothing either way, as dlogits carries a factor p).
    """
    if SOFT:
        dp = d_probs + d_gates
    else:
        chosen = gates > 0.0
        s = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
        s = tl.where(s > 0.0, s, 1.0)  # rows past T hold zeros
        g_dot = tl.sum(gates * d_gates, axis=1)
        dp = d_probs + tl.where(chosen, (d_gates - g_dot[:, None]) / s[:, None], 0.0)
    return probs * (dp - tl.sum(probs * dp, axis=1)[:, None])


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

_ROUTE_CONFIGS = autotune_configs(
    gpu=[
        dict(BLOCK_T=32, num_warps=2, num_stages=1),
        dict(BLOCK_T=64, num_warps=4, num_stages=1),
        dict(BLOCK_T=128, num_warps=4, num_stages=1),
        dict(BLOCK_T=256, num_warps=8, num_stages=1),
    ],
    interpreter=dict(BLOCK_T=32, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_ROUTE_CONFIGS, key=["T_BUCKET", "E"], prune_configs_by=AUTOTUNE_PRUNE)
@triton.jit
def _route_fwd_kernel(logits_ptr, gates_ptr, probs_ptr, idx_ptr,
                      T, T_BUCKET, E, stride_lt, stride_le,
                      TOP_K: tl.constexpr, SOFT: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """logits [T, E] (any float dtype) -> gates, probs [T, E] fp32 (contiguous), idx [T, TOP_K] int64.

    One program per BLOCK_T tokens; idx is not written for the soft router.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64 offsets
    e_offs = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    e_mask = e_offs < E
    mask = row_mask[:, None] & e_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_lt + e_offs[None, :] * stride_le,
                     mask=mask, other=0.0).to(tl.float32)
    route_rows_and_store(logits, e_offs, e_mask, rows, row_mask, idx_ptr, probs_ptr, gates_ptr, E, TOP_K, SOFT,
                         BLOCK_E)


@triton.autotune(configs=_ROUTE_CONFIGS, key=["T_BUCKET", "E"], prune_configs_by=AUTOTUNE_PRUNE)
@triton.jit
def _route_bwd_kernel(d_gates_ptr, d_probs_ptr, gates_ptr, probs_ptr, d_logits_ptr,
                      T, T_BUCKET, E, stride_dlt, stride_dle,
                      HAS_DGATES: tl.constexpr, HAS_DPROBS: tl.constexpr, SOFT: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """d_gates, d_probs, gates, probs [T, E] fp32 contiguous -> d_logits [T, E] (its own dtype/strides)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64 offsets
    e_offs = tl.arange(0, BLOCK_E)
    mask = (rows < T)[:, None] & (e_offs < E)[None, :]
    off = rows[:, None] * E + e_offs[None, :]
    gates = tl.load(gates_ptr + off, mask=mask, other=0.0)
    probs = tl.load(probs_ptr + off, mask=mask, other=0.0)
    d_gates = tl.zeros_like(gates)
    d_probs = tl.zeros_like(probs)
    if HAS_DGATES:
        d_gates = tl.load(d_gates_ptr + off, mask=mask, other=0.0)
    if HAS_DPROBS:
        d_probs = tl.load(d_probs_ptr + off, mask=mask, other=0.0)
    d_logits = route_bwd_rows(d_gates, d_probs, gates, probs, SOFT)
    tl.store(d_logits_ptr + rows[:, None] * stride_dlt + e_offs[None, :] * stride_dle,
             d_logits.to(d_logits_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Autograd Function and public entry point
# --------------------------------------------------------------------------------------------------

def _grad_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


class RouteFunction(torch.autograd.Function):
    """logits [T, E] -> (gates [T, E] fp32, probs [T, E] fp32, topk_idx [T, k] int64 or None)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int, soft: bool):
        T, E = logits.shape
        gates = torch.empty(T, E, device=logits.device, dtype=torch.float32)
        probs = torch.empty_like(gates)
        idx = None if soft else torch.empty(T, top_k, device=logits.device, dtype=torch.int64)
        if T > 0:
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)  # noqa: E731
            _route_fwd_kernel[grid](
                logits, gates, probs, gates if idx is None else idx,
                T, token_bucket(T), E, logits.stride(0), logits.stride(1),
                TOP_K=top_k, SOFT=soft, BLOCK_E=expert_block(E),
            )
        ctx.set_materialize_grads(False)  # unused outputs send None: their kernel loads are skipped
        ctx.soft = soft
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(gates, probs)
        if idx is not None:
            ctx.mark_non_differentiable(idx)
        return gates, probs, idx

    @staticmethod
    def backward(ctx, d_gates, d_probs, _d_idx):
        if d_gates is None and d_probs is None:
            return None, None, None
        gates, probs = ctx.saved_tensors
        T, E = gates.shape
        d_logits = torch.empty(T, E, device=gates.device, dtype=ctx.logits_dtype)
        d_gates, d_probs = _grad_or_none(d_gates), _grad_or_none(d_probs)
        if T > 0:
            grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)  # noqa: E731
            _route_bwd_kernel[grid](
                gates if d_gates is None else d_gates, probs if d_probs is None else d_probs,
                gates, probs, d_logits,
                T, token_bucket(T), E, d_logits.stride(0), d_logits.stride(1),
                HAS_DGATES=d_gates is not None, HAS_DPROBS=d_probs is not None, SOFT=ctx.soft,
                BLOCK_E=expert_block(E),
            )
        return d_logits, None, None


def all_experts_idx(n_tokens: int, num_experts: int, device) -> torch.Tensor:
    """``topk_idx`` of a router that uses every expert: [T, E] int64, 0..E-1 on every row (a view)."""
    return torch.arange(num_experts, device=device).expand(n_tokens, num_experts)


def route_triton(logits: torch.Tensor, top_k: int, router: str = "topk") -> Routing:
    """Triton version of :func:`molora_kernels.routing.route` (same arguments, same result).

    Args:
        logits: [..., E] router logits, any float dtype (read as float32 inside the kernel).
        top_k: experts per token for the "topk" router, 1 <= top_k <= E.
        router: "topk" (MoLA) or "soft" (gates = probs).
    Returns:
        Routing with float32 ``gates``/``probs`` [..., E] and int64 ``topk_idx`` [..., k]. Gradients
        reach the logits through both ``gates`` and ``probs``. For "soft" (and k == E) ``gates`` and
        ``probs`` are equal but distinct tensors, and ``topk_idx`` is an expanded arange as in ``route``.
    """
    num_experts = logits.shape[-1]
    _check_route_args(num_experts, top_k, router)
    soft = get_router(router).gates_are_probs(top_k, num_experts)
    lead = logits.shape[:-1]
    logits2 = logits.reshape(-1, num_experts)
    gates, probs, idx = RouteFunction.apply(logits2, top_k, soft)
    if idx is None:
        idx = all_experts_idx(logits2.shape[0], num_experts, logits.device)
    return Routing(
        gates=gates.reshape(*lead, num_experts),
        probs=probs.reshape(*lead, num_experts),
        topk_idx=idx.reshape(*lead, idx.shape[-1]),
    )


__all__ = ["HAS_TRITON", "INTERPRET", "is_triton_available", "route_triton", "RouteFunction"]
