"""Sparse (sorted, grouped) MoE-LoRA: backend ``"sparse"``, for many experts and large ranks.

The dense-gated path computes every expert on every token (E·r columns); when E/k and r are large
that is most of the work. Here each token only meets its k chosen experts::

    flat        = topk_idx.reshape(-1)                  # [T·k] expert of every (token, slot)
    order       = argsort(flat, stable=True)            # index-only sort: no padded copy, no capacity
    tok         = order // k                            # token of each sorted slot
    offs        = cumsum(bincount(flat, minlength=E))   # group ends, int32
    xs          = x[tok]                                # [T·k, d_in] (the one gather of x)
    hs          = grouped_mm(xs, A3, offs)              # A3 [E, d_in, r]     per-expert shrink
    ys          = grouped_mm(hs * s·w_sorted, B3, offs) # B3 [E, r, d_out]    per-expert expand
    out[tok]   += ys                                    # combine (index_add)

and the backward mirrors it (grouped weight-gradients ``grouped_mm(hs.T, dys, offs)`` give dA/dB of
all experts in the stacked layout). Outputs and gradients equal the dense path (same routing code,
same dropout mask: ``F.dropout`` is applied to x outside, before the gather).

Every expert takes part in every step, also with zero tokens (docs/design.md §4: under DeepSpeed
ZeRO-1/2 a skipped expert gives silently wrong gradients): the grouped GEMMs take all E groups,
empty groups produce zero gradient rows, and the stacked A_all / B_all receive a full gradient.

Two implementations of the per-expert GEMMs (``impl``), the same numbers:

* ``"grouped_mm"``: ``torch.nn.functional.grouped_mm``. It runs on CPU in torch 2.13 for fp32, bf16
  and fp16 (checked), but needs contiguous ``[E, K, N]`` weights (with a transposed view it is ~40x
  slower) and rows aligned to 16 bytes, so A_all / B_all are re-laid out per call (copies of E·r·d)
  and odd-rank operands padded. Where it refuses the inputs (old torch, CUDA before SM80, dtypes) the
  call falls back to the loop. The default off CPU: one launch, no host sync.
* ``"loop"``: one ``mm`` per expert on strided views of A_all / B_all (BLAS takes the transposes for
  free) writing into slices of the outputs: no weight copies, one host sync for the group sizes.
  The default on CPU, where ``grouped_mm`` is itself a loop of ``mm`` over the groups: measured
  fwd+bwd T=d=2048 (sparse/dense) E,k,r = 64,2,64: loop 0.16 vs grouped_mm 0.20; 64,2,16: 0.37 vs
  0.42; equal elsewhere.

On CPU the per-expert GEMMs run single-threaded (``CPU_EXPERT_THREADS``): see there why.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from .routing import Routing, route
from .routers import get_router
from .torch_fused import prepare_operands

_GMM_BROKEN: set[tuple[str, torch.dtype, int]] = set()

#: Intra-op threads for the per-expert GEMMs on CPU (0 = leave torch's setting alone). Each small GEMM
#: is one OpenMP parallel region; on a shared, oversubscribed CPU every region waits for a descheduled
#: worker thread. Measured on the project's 2-core machine under load (E=64, k=2, r=16, T=d=2048,
#: fwd+bwd): 13.3 s median with 2 threads, 1.15 s with 1 (the dense path: 3.7 s). Override with the
#: environment variable MOLORA_SPARSE_CPU_THREADS.
CPU_EXPERT_THREADS = int(os.environ.get("MOLORA_SPARSE_CPU_THREADS", "1"))


@contextlib.contextmanager
def _expert_threads(device: torch.device) -> Iterator[None]:
    n = CPU_EXPERT_THREADS
    prev = torch.get_num_threads()
    if device.type != "cpu" or n <= 0 or prev <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def grouped_mm_available() -> bool:
    return hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def _gmm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Reference grouped GEMM: a Python loop over every group (empty ones included)."""
    bounds = _bounds(offs)
    if b.dim() == 3:  # a [N, K] jagged rows, b [G, K, M] -> [N, M]
        out = a.new_empty(a.shape[0], b.shape[2])
        if bounds and bounds[-1][1] < a.shape[0]:
            out[bounds[-1][1]:].zero_()
        for g, (s, e) in enumerate(bounds):
            torch.mm(a[s:e], b[g], out=out[s:e])
        return out
    # a [K, N] jagged columns, b [N, M] jagged rows -> [G, K, M]
    out = a.new_empty(len(bounds), a.shape[0], b.shape[1])
    for g, (s, e) in enumerate(bounds):
        torch.mm(a[:, s:e], b[s:e], out=out[g])
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy whose row strides are multiples of 16 bytes (``grouped_mm`` needs that).

    The copy is a view of a buffer with padded rows (e.g. rank 3 or an odd token count), same values.
    """
    es = t.element_size()
    if t.stride(-1) == 1 and all((st * es) % 16 == 0 for st in t.stride()[:-1]):
        return t
    cols = t.shape[-1]
    buf = t.new_empty(*t.shape[:-1], cols + (-cols % max(1, 16 // es)))
    view = buf[..., :cols]
    view.copy_(t)
    return view


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, force_loop: bool = False) -> torch.Tensor:
    """``torch.nn.functional.grouped_mm(a, b, offs=offs)`` with a loop fallback (see module doc).

    a [N, K] with b [G, K, M] -> [N, M] (rows of a grouped by ``offs``); a [K, N] with b [N, M] ->
    [G, K, M] (the shared N grouped: weight gradients). A (device, dtype, form) that grouped_mm refuses
    once, with aligned inputs, takes the loop from then on.
    """
    key = (a.device.type, a.dtype, b.dim())
    if not force_loop and key not in _GMM_BROKEN and grouped_mm_available():
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        try:
            return fn(_aligned(a), _aligned(b), offs=offs)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            _GMM_BROKEN.add(key)
    return _gmm_loop(a, b, offs)


class _Experts:
    """The six per-expert products of the sparse path on the stacked weights, for one call.

    ``impl="grouped_mm"``: ``grouped_mm`` on weights re-laid out as contiguous [E, K, N] (copies of
    E·r·d elements: grouped_mm is ~40x slower on strided weights). ``impl="loop"``: one ``mm`` per
    expert on strided views of A_all / B_all (BLAS takes the transposes for free; no copy), outputs
    written in place; needs the group sizes on the host. Both visit every expert, empty ones included.
    """

    def __init__(self, a_all: torch.Tensor, b_all: torch.Tensor, num_experts: int, offs: torch.Tensor,
                 impl: str) -> None:
        self.a, self.b, self.E, self.offs, self.impl = a_all, b_all, num_experts, offs, impl
        self.r = a_all.shape[0] // num_experts
        self.bounds = _bounds(offs) if impl == "loop" else None

    def _rows(self, e: int) -> slice:
        return slice(e * self.r, (e + 1) * self.r)

    def shrink(self, xs: torch.Tensor) -> torch.Tensor:               # hs[g] = xs[g] @ A_e.T   [N, r]
        if self.impl != "loop":
            a3 = self.a.view(self.E, self.r, -1).transpose(1, 2).contiguous()       # [E, d_in, r]
            return grouped_mm(xs, a3, self.offs)
        out = xs.new_empty(xs.shape[0], self.r)
        for e, (s, t) in enumerate(self.bounds):
            torch.mm(xs[s:t], self.a[self._rows(e)].t(), out=out[s:t])
        return out

    def expand(self, hgs: torch.Tensor) -> torch.Tensor:              # ys[g] = hgs[g] @ B_e.T  [N, d_out]
        d_out = self.b.shape[0]
        if self.impl != "loop":
            b3 = self.b.view(d_out, self.E, self.r).permute(1, 2, 0).contiguous()  # [E, r, d_out]
            return grouped_mm(hgs, b3, self.offs)
        out = hgs.new_empty(hgs.shape[0], d_out)
        for e, (s, t) in enumerate(self.bounds):
            torch.mm(hgs[s:t], self.b[:, self._rows(e)].t(), out=out[s:t])
        return out

    def grad_b(self, dys: torch.Tensor, hgs: torch.Tensor) -> torch.Tensor:   # dB_e = dys[g].T @ hgs[g]
        d_out = self.b.shape[0]
        if self.impl != "loop":
            db3 = grouped_mm(hgs.t().contiguous(), dys, self.offs)                 # [E, r, d_out]
            return db3.permute(2, 0, 1).reshape(d_out, self.E * self.r)
        out = dys.new_empty(d_out, self.E * self.r)
        for e, (s, t) in enumerate(self.bounds):
            torch.mm(dys[s:t].t(), hgs[s:t], out=out[:, self._rows(e)])
        return out

    def grad_h(self, dys: torch.Tensor) -> torch.Tensor:              # dhgs[g] = dys[g] @ B_e   [N, r]
        d_out = self.b.shape[0]
        if self.impl != "loop":
            bt3 = self.b.view(d_out, self.E, self.r).permute(1, 0, 2).contiguous()  # [E, d_out, r]
            return grouped_mm(dys, bt3, self.offs)
        out = dys.new_empty(dys.shape[0], self.r)
        for e, (s, t) in enumerate(self.bounds):
            torch.mm(dys[s:t], self.b[:, self._rows(e)], out=out[s:t])
        return out

    def grad_a(self, dhs: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:    # dA_e = dhs[g].T @ xs[g]
        if self.impl != "loop":
            return grouped_mm(dhs.t().contiguous(), xs, self.offs).reshape(self.E * self.r, xs.shape[1])
        out = xs.new_empty(self.E * self.r, xs.shape[1])
        for e, (s, t) in enumerate(self.bounds):
            torch.mm(dhs[s:t].t(), xs[s:t], out=out[self._rows(e)])
        return out

    def grad_x(self, dhs: torch.Tensor) -> torch.Tensor:              # dxs[g] = dhs[g] @ A_e   [N, d_in]
        if self.impl != "loop":
            return grouped_mm(dhs, self.a.view(self.E, self.r, -1), self.offs)      # already [E, r, d_in]
        out = dhs.new_empty(dhs.shape[0], self.a.shape[1])
        for e, (s, t) in enumerate(self.bounds):
            torch.mm(dhs[s:t], self.a[self._rows(e)], out=out[s:t])
        return out


def default_impl(device: torch.device | str) -> str:
    """"loop" on CPU (same per-group GEMMs as grouped_mm there, without the weight re-layouts),
    "grouped_mm" elsewhere when torch has it (one launch, no host sync)."""
    if torch.device(device).type == "cpu" or not grouped_mm_available():
        return "loop"
    return "grouped_mm"


class SparseGroupedMoLoRA(torch.autograd.Function):
    """Same contract as :class:`torch_fused.DenseGatedMoLoRA`, computed on tokens sorted by expert."""

    @staticmethod
    def forward(ctx, x, xd, a_all, b_all, router_weight, base, top_k: int, scaling: float, router: str,
                impl: str):
        num_experts, d_in = router_weight.shape
        d_out = b_all.shape[0]
        tokens = x.shape[0]
        logits = torch.mm(x, router_weight.t())
        routing = route(logits, top_k, router)
        probs, gates, idx = routing.probs, routing.gates, routing.topk_idx
        if gates is probs:
            gates = probs.clone()
        k = idx.shape[1]
        weights = gates.gather(1, idx)                                  # [T, k] fp32
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)                        # index-only sort
        tok = torch.div(order, k, rounding_mode="floor")
        offs = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
        experts = _Experts(a_all, b_all, num_experts, offs, impl)
        xin = x if xd is None else xd
        xs = xin.index_select(0, tok)                                   # [N, d_in]
        gdt = torch.promote_types(x.dtype, torch.float32)           # the scaled gate in >= fp32 (float64 stays)
        gsort = (weights.reshape(-1)[order].to(gdt) * scaling).to(x.dtype)  # [N]
        with _expert_threads(x.device):
            hs = experts.shrink(xs)                                     # [N, r]
            ys = experts.expand(hs * gsort[:, None])                    # [N, d_out]
        del xs
        out = torch.zeros(tokens, d_out, dtype=x.dtype, device=x.device) if base is None else base.clone()
        out.index_add_(0, tok, ys)
        ctx.save_for_backward(x, xd, a_all, b_all, router_weight, probs, idx, order, tok, offs, hs, gsort)
        r = get_router(router)
        ctx.meta = (num_experts, base is not None, r, top_k, r.gates_are_probs(top_k, num_experts), scaling, impl)
        ctx.mark_non_differentiable(gates, idx)
        return out, probs, gates, idx

    @staticmethod
    def backward(ctx, dout, dprobs, _dgates, _didx):
        x, xd, a_all, b_all, router_weight, probs, idx, order, tok, offs, hs, gsort = ctx.saved_tensors
        num_experts, has_base, router, top_k, gates_are_probs, scaling, impl = ctx.meta
        need_x, need_xd, need_a, need_b, need_w, need_base = ctx.needs_input_grad[:6]
        tokens, d_in = x.shape
        d_out = b_all.shape[0]
        k = idx.shape[1]
        dx = dxd = da = db = dw = None
        dbase = dout if (has_base and need_base) else None
        if dout is None:
            dout = torch.zeros(tokens, d_out, dtype=x.dtype, device=x.device)
        if dout.dtype != x.dtype:
            dout = dout.to(x.dtype)
        experts = _Experts(a_all, b_all, num_experts, offs, impl)
        dys = dout.index_select(0, tok)                                 # [N, d_out]
        need_in = need_x or need_xd or need_a or need_w
        with _expert_threads(x.device):
            if need_b:
                db = experts.grad_b(dys, hs * gsort[:, None])
            dhgs = experts.grad_h(dys) if need_in else None             # [N, r]
        del dys
        if not need_in:
            return dx, dxd, da, db, dw, dbase, None, None, None, None
        dgsort = (dhgs * hs).sum(-1).float().mul_(scaling)              # d loss / d weight, sorted
        dweights = torch.empty_like(dgsort).scatter_(0, order, dgsort).view(tokens, k)
        if gates_are_probs:
            dgates = dweights                                           # idx is arange: slot j = expert j
        else:
            dgates = torch.zeros_like(probs).scatter_(1, idx, dweights)
        dlogits = router.logits_grad(dgates, dprobs, probs, idx, top_k).to(x.dtype)
        dhs = dhgs * gsort[:, None]                                     # [N, r]
        xin = x if xd is None else xd
        if need_a:
            xs = xin.index_select(0, tok)                               # gather again: saves T·k·d_in memory
            with _expert_threads(x.device):
                da = experts.grad_a(dhs, xs)
            del xs
        if need_w:
            dw = torch.mm(dlogits.t(), x)
        if need_x or need_xd:
            with _expert_threads(x.device):
                dxs = experts.grad_x(dhs)                               # [N, d_in]
            dxin = torch.zeros(tokens, d_in, dtype=x.dtype, device=x.device).index_add_(0, tok, dxs)
            if xd is None:
                dx = dxin.addmm_(dlogits, router_weight) if need_x else None
            else:
                dxd = dxin if need_xd else None
                dx = torch.mm(dlogits, router_weight) if need_x else None
        elif need_x:
            dx = torch.mm(dlogits, router_weight)
        return dx, dxd, da, db, dw, dbase, None, None, None, None


def moe_lora_sparse(x2: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, router_weight: torch.Tensor, *,
                    top_k: int, scaling: float, dropout: float = 0.0, training: bool = False,
                    router: str = "topk", base: Optional[torch.Tensor] = None,
                    impl: Optional[str] = None) -> tuple[torch.Tensor, Routing]:
    """Sparse grouped MoE-LoRA on flat tokens ``x2`` [T, d_in]; same contract as ``moe_lora_fused``.

    impl: "grouped_mm" or "loop" (see :class:`_Experts`); None = :func:`default_impl` of the device.
    """
    impl = default_impl(x2.device) if impl is None else impl
    if impl not in ("grouped_mm", "loop"):
        raise ValueError(f"impl={impl!r}; allowed: grouped_mm, loop")
    a, b, w, xd, base = prepare_operands(x2, a_all, b_all, router_weight, dropout, training, base)
    out, probs, gates, idx = SparseGroupedMoLoRA.apply(x2, xd, a, b, w, base, top_k, float(scaling), router, impl)
    return out, Routing(gates=gates, probs=probs, topk_idx=idx)
