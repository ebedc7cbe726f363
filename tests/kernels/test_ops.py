"""The MoE-LoRA op: every backend against a naive per-token, per-expert reference of docs/design.md §2.

The naive reference loops over tokens and their chosen experts in float64; it checks the output and the
gradients of x, A_all, B_all and the router weight, with a loss on the output and on the statistics'
``prob_sum`` (the aux-loss path). The sparse path is also checked against the dense path on routings
that leave experts without tokens.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from molora_kernels import available_backends, moe_lora
from molora_kernels import cost_model, ops
from molora_kernels.sparse import _GMM_BROKEN, grouped_mm, moe_lora_sparse
from molora_kernels.torch_fused import moe_lora_fused

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]   # triton: tests/kernels/test_triton_kernels.py
CONFIGS = [(8, 2, 4), (4, 4, 3), (1, 1, 5), (6, 1, 8), (16, 3, 2)]        # (E, k, r): E == k, E == 1 included


# --------------------------------------------------------------------------------------------------
# The naive reference


def naive_moe_lora(x2, xd2, a_all, b_all, w_router, *, top_k, scaling, router, forced_idx=None,
                   logits_dtype=None):
    """Per-token loop of docs/design.md §2 in float64. Returns (y [T, d_out], probs [T, E]).

    forced_idx: use these top-k experts (bf16: the backend's selection, since bf16 logits can reorder
    near-ties); logits_dtype: round the logits to this dtype first (what a bf16 GEMM returns).
    """
    num_experts = w_router.shape[0]
    rank = a_all.shape[0] // num_experts
    x64, xd64 = x2.double(), xd2.double()
    A = a_all.double().view(num_experts, rank, -1)
    B = b_all.double().view(b_all.shape[0], num_experts, rank)
    logits = x64 @ w_router.double().t()
    if logits_dtype is not None:
        logits = logits.to(logits_dtype).double()
    probs = torch.softmax(logits, dim=-1)
    ys = []
    for t in range(x2.shape[0]):
        p = probs[t]
        if router == "soft":
            sel, g = list(range(num_experts)), p
        else:
            if forced_idx is None:
                v, sel = torch.topk(p, top_k)
                sel = sel.tolist()
            else:
                sel = forced_idx[t].tolist()
                v = p[sel]
            g = v / v.sum()
        y = torch.zeros(b_all.shape[0], dtype=torch.float64)
        for j, e in enumerate(sel):
            y = y + g[j] * scaling * (B[:, e, :] @ (A[e] @ xd64[t]))
        ys.append(y)
    return torch.stack(ys), probs


def _inputs(shape, d_in, d_out, E, r, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_in, generator=g).to(dtype).requires_grad_()
    a = (torch.randn(E * r, d_in, generator=g) / math.sqrt(d_in)).requires_grad_()
    b = (torch.randn(d_out, E * r, generator=g) / math.sqrt(r)).requires_grad_()
    w = torch.randn(E, d_in, generator=g).requires_grad_()
    dy = torch.randn(*shape, d_out, generator=g)
    c = torch.randn(E, generator=g)
    return x, a, b, w, dy, c


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, gs, strict=True)]


def _assert_close(actual, expected, tol, what):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() + 1e-12
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} x {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("router", ["topk", "soft"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"E{e}k{k}r{r}" for e, k, r in CONFIGS])
@pytest.mark.parametrize("layout", ["2d", "3d-dropout"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_naive(backend, layout, cfg, router, dtype):
    E, k, r = cfg
    d_in, d_out = 12, 10
    shape = (13,) if layout == "2d" else (2, 7)
    dropout = 0.0 if layout == "2d" else 0.3
    seed = zlib.crc32(f"{backend}{layout}{cfg}{router}{dtype}".encode()) % 10_000
    x, a, b, w, dy, c = _inputs(shape, d_in, d_out, E, r, dtype, seed)
    scaling = 0.75

    torch.manual_seed(1234)
    out = moe_lora(x, a, b, w, top_k=k, scaling=scaling, dropout=dropout, training=True, router=router,
                   backend=backend)
    assert out.delta.shape == (*shape, d_out) and out.delta.dtype == dtype
    loss = (out.delta.float() * dy).sum() + (out.stats.prob_sum * c).sum()
    got = [out.delta] + _grads(loss, [x, a, b, w])

    # the same dropout mask: same seed, same shape and dtype -> F.dropout draws the same noise
    torch.manual_seed(1234)
    mask = F.dropout(torch.ones_like(x), p=dropout, training=True) if dropout else torch.ones_like(x)
    x2 = x.reshape(-1, d_in)
    xd2 = (x * mask).reshape(-1, d_in)
    bf16 = dtype == torch.bfloat16
    y, probs = naive_moe_lora(x2, xd2, a.to(dtype), b.to(dtype), w.to(dtype), top_k=k, scaling=scaling,
                              router=router, forced_idx=out.routing.topk_idx if bf16 else None,
                              logits_dtype=dtype if bf16 else None)
    if not bf16 and router == "topk":
        assert torch.equal(out.routing.topk_idx.sort(-1).values,
                           torch.topk(probs, k).indices.sort(-1).values), "top-k selection differs"
    ref_loss = (y * dy.reshape(-1, d_out).double()).sum() + (probs.sum(0) * c.double()).sum()
    want = [y.reshape(*shape, d_out)] + _grads(ref_loss, [x, a, b, w])

    tol = 2e-5 if dtype == torch.float32 else 4e-2
    for name, g_, w_ in zip(["out", "dx", "dA", "dB", "dW_router"], got, want, strict=True):
        _assert_close(g_, w_, tol, f"{backend} {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stats_and_mask(backend):
    E, k, r = 6, 2, 4
    x, a, b, w, dy, c = _inputs((2, 5), 8, 8, E, r, torch.float32, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = moe_lora(x, a, b, w, top_k=k, scaling=1.0, token_mask=mask, backend=backend)
    probs = torch.softmax((x.reshape(-1, 8) @ w.t()).double(), -1)
    m = mask.reshape(-1)
    torch.testing.assert_close(out.stats.prob_sum.double(), probs[m].sum(0), rtol=1e-5, atol=1e-6)
    assert out.stats.counts.sum().item() == m.sum().item() * k
    assert out.stats.n_tokens.item() == m.sum().item()


# --------------------------------------------------------------------------------------------------
# Sparse == dense, including experts that get no token


def _skewed(T, d_in, d_out, E, r, dead, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, d_in, generator=g) + 2.0).requires_grad_()       # every feature positive on average
    w = torch.randn(E, d_in, generator=g)
    w[list(dead)] = -3.0                                                   # these experts never win
    a = (torch.randn(E * r, d_in, generator=g) / math.sqrt(d_in)).requires_grad_()
    b = torch.randn(d_out, E * r, generator=g).requires_grad_()
    return x, a, b, w.requires_grad_(), torch.randn(T, d_out, generator=g), torch.randn(E, generator=g)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("E,k,r", [(8, 2, 4), (12, 3, 3), (5, 1, 1), (32, 2, 16)])
def test_sparse_equals_dense_with_empty_experts(E, k, r, impl):
    dead = {0, E - 2} if E > 4 else {0}
    x, a, b, w, dy, c = _skewed(40, 16, 12, E, r, dead, seed=E * 10 + k)
    res = {}
    for name, fn in [("dense", moe_lora_fused), ("sparse", moe_lora_sparse)]:
        kw = {"impl": impl} if name == "sparse" else {}
        out, routing = fn(x, a, b, w, top_k=k, scaling=0.5, **kw)
        loss = (out * dy).sum() + (routing.probs.sum(0) * c).sum()
        res[name] = [out, routing.gates, *_grads(loss, [x, a, b, w])]
        counts = torch.zeros(E).scatter_add_(0, routing.topk_idx.reshape(-1), torch.ones(routing.topk_idx.numel()))
        assert all(counts[e] == 0 for e in dead), "the test routing should leave experts empty"
    for i, name in enumerate(["out", "gates", "dx", "dA", "dB", "dW"]):
        torch.testing.assert_close(res["sparse"][i], res["dense"][i], rtol=2e-5, atol=2e-5, msg=name)
    da, db = res["sparse"][3], res["sparse"][4]
    assert da.shape == a.shape and db.shape == b.shape      # a full gradient: every expert takes part
    for e in dead:
        assert torch.count_nonzero(da[e * r:(e + 1) * r]) == 0
        assert torch.count_nonzero(db[:, e * r:(e + 1) * r]) == 0


def test_sparse_random_routings_many_seeds():
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        E = int(torch.randint(2, 24, (1,), generator=g))
        r = int(torch.randint(1, 9, (1,), generator=g))
        k = int(torch.randint(1, E + 1, (1,), generator=g))
        T = int(torch.randint(1, 30, (1,), generator=g))
        x, a, b, w, dy, c = _inputs((T,), 9, 7, E, r, torch.float32, seed)
        outs = []
        for be in ("torch", "sparse"):
            o = moe_lora(x, a, b, w, top_k=k, scaling=2.0, backend=be)
            loss = (o.delta * dy).sum() + (o.stats.prob_sum * c).sum()
            outs.append([o.delta, *_grads(loss, [x, a, b, w])])
        for u, v in zip(*outs, strict=True):
            torch.testing.assert_close(u, v, rtol=3e-5, atol=3e-5)


def test_sparse_restores_thread_count():
    x, a, b, w, dy, c = _inputs((20,), 8, 8, 6, 2, torch.float32, 4)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = moe_lora(x, a, b, w, top_k=2, scaling=1.0, backend="sparse")
        assert torch.get_num_threads() == 2
        (out.delta * dy).sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


def test_grouped_mm_helper_matches_loop():
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([0, 5, 5, 12, 17], dtype=torch.int32)   # empty groups first and in the middle
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(17, 3, generator=g).to(dt)                  # rank 3: unaligned rows
        b3 = torch.randn(5, 3, 7, generator=g).to(dt)
        torch.testing.assert_close(grouped_mm(a, b3, offs), grouped_mm(a, b3, offs, force_loop=True))
        at = torch.randn(3, 17, generator=g).to(dt)
        b2 = torch.randn(17, 6, generator=g).to(dt)
        got = grouped_mm(at, b2, offs)
        torch.testing.assert_close(got, grouped_mm(at, b2, offs, force_loop=True))
        assert torch.count_nonzero(got[0]) == 0 and torch.count_nonzero(got[2]) == 0
    assert not _GMM_BROKEN, f"grouped_mm fell back to the loop on CPU for {_GMM_BROKEN}"


# --------------------------------------------------------------------------------------------------
# API details


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_base_fusion_and_partial_grads(backend):
    x, a, b, w, dy, c = _inputs((3, 4), 8, 6, 4, 2, torch.float32, 7)
    base = torch.randn(3, 4, 6, requires_grad=True)
    plain = moe_lora(x, a, b, w, top_k=2, scaling=1.0, backend=backend).delta
    fused = moe_lora(x, a, b, w, top_k=2, scaling=1.0, backend=backend, base=base).delta
    torch.testing.assert_close(fused, base + plain)
    (gb,) = torch.autograd.grad((fused * dy).sum(), [base])
    torch.testing.assert_close(gb, dy)
    # only B trainable, x without grad: the other gradients are not computed
    x2 = x.detach()
    a2, w2 = a.detach(), w.detach()
    out = moe_lora(x2, a2, b, w2, top_k=2, scaling=1.0, backend=backend)
    (gB,) = torch.autograd.grad((out.delta * dy).sum(), [b])
    ref = moe_lora(x2, a2, b, w2, top_k=2, scaling=1.0, backend="reference")
    (gB_ref,) = torch.autograd.grad((ref.delta * dy).sum(), [b])
    torch.testing.assert_close(gB, gB_ref)
    with torch.no_grad():
        torch.testing.assert_close(moe_lora(x, a, b, w, top_k=2, scaling=1.0, backend=backend).delta, plain)


def test_single_expert_is_peft_lora():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=False).requires_grad_(False)
    lora = LoraLinear(base, "default", LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    torch.nn.init.normal_(lora.lora_B["default"].weight)
    a = lora.lora_A["default"].weight.detach().clone()
    b = lora.lora_B["default"].weight.detach().clone()
    x = torch.randn(2, 5, 16)
    for be in CPU_BACKENDS:
        out = moe_lora(x, a, b, torch.randn(1, 16), top_k=1, scaling=lora.scaling["default"], backend=be)
        torch.testing.assert_close(base(x) + out.delta, lora(x), rtol=1e-5, atol=1e-5)


def test_backend_errors_and_listing():
    x, a, b, w, *_ = _inputs((4,), 8, 8, 2, 2, torch.float32, 0)
    with pytest.raises(ValueError, match="allowed: auto"):
        moe_lora(x, a, b, w, top_k=1, scaling=1.0, backend="cuda-magic")
    avail = available_backends("cpu")
    assert {"torch", "reference", "sparse"} <= set(avail)
    if "triton" not in avail:
        with pytest.raises(ValueError, match=r"'triton' is not available on cpu.*CUDA.*available: torch, reference, sparse"):
            moe_lora(x, a, b, w, top_k=1, scaling=1.0, backend="triton")


def test_triton_import_guard(monkeypatch):
    """ops works whether or not triton_moe_lora imports; a failed import is reported, not raised."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # so that CPU asks the module at all
    from molora_kernels import backends

    monkeypatch.setattr(backends, "_TRITON", {"module": None, "error": "ModuleNotFoundError: No module named 'triton'"})
    assert "triton" not in available_backends("cpu")
    x, a, b, w, *_ = _inputs((4,), 8, 8, 2, 2, torch.float32, 0)
    with pytest.raises(ValueError, match="No module named 'triton'"):
        moe_lora(x, a, b, w, top_k=1, scaling=1.0, backend="triton")
    assert moe_lora(x, a, b, w, top_k=1, scaling=1.0, backend="auto").delta.shape == (4, 8)


def test_cost_model_choices():
    pick = lambda **kw: cost_model.choose_backend(**{"tokens": 2048, "d_in": 2048, "d_out": 2048, **kw})  # noqa: E731
    assert pick(num_experts=8, top_k=2, rank=8) == "torch"             # MoLA's usual sizes: dense-gated
    assert pick(num_experts=2, top_k=2, rank=8) == "torch"             # E == k: nothing to skip
    assert pick(num_experts=64, top_k=2, rank=64) == "sparse"          # large E·r: sort + grouped GEMMs
    assert pick(num_experts=8, top_k=2, rank=8, device="cuda", triton=True) == "triton"    # fused dense-gated
    assert pick(num_experts=64, top_k=2, rank=64, device="cuda", triton=True) == "sparse"
    assert pick(num_experts=1, top_k=1, rank=8) == "torch"
    x, a, b, w, *_ = _inputs((4,), 8, 8, 2, 2, torch.float32, 0)
    assert ops.resolve_backend("auto", x, a, b, w, 1, "topk") in available_backends("cpu")


def test_dropout_is_replayed_not_saved():
    """With dropout the fused op saves the RNG state of the draw instead of dropout(x) ([T, d_in] per module),
    replays it in backward, and leaves the run's RNG stream exactly where the reference leaves it."""
    T, d_in, d_out, E, r = 64, 48, 40, 4, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, d_in, generator=g, requires_grad=True)
    a = torch.randn(E * r, d_in, generator=g, requires_grad=True)
    b = torch.randn(d_out, E * r, generator=g, requires_grad=True)
    w = torch.randn(E, d_in, generator=g, requires_grad=True)
    kw = dict(top_k=2, scaling=2.0, dropout=0.2, training=True)

    def run(backend):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        torch.manual_seed(11)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = moe_lora(x, a, b, w, backend=backend, **kw)
        grads = torch.autograd.grad(out.delta.sum() + out.routing.probs.sum(), (x, a, b, w))
        return out.delta, grads, saved, torch.rand(4)

    y_ref, g_ref, _, after_ref = run("reference")
    y, grads, saved, after = run("torch")
    assert torch.equal(y, y_ref), "the same mask and values as F.dropout"
    for got, want in zip(grads, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, after_ref), "backward's replay does not move the RNG stream"
    big = [t for t in saved if t.shape == (T, d_in) and t.data_ptr() != x.data_ptr()]
    assert not big, f"a [T, d_in] tensor besides x was saved: {[t.shape for t in big]}"


@pytest.mark.parametrize("router", ["topk", "soft"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_inputs_stay_float64(backend, router):
    """A float64 model (gradient checks) gets float64 arithmetic on every backend: the same result as the reference
    to float64 rounding, outputs and the expert gradients. The gates are float32 on every backend (the routing
    softmax is), but the scaling alpha / r used to be folded into them in float32 too: 16 / 3 is not exact there
    (3e-8 off)."""
    E, k, r = 4, 2, 3
    x, a, b, w, dy, c = _inputs((9,), 12, 10, E, r, torch.float64, 7)
    a, b, w = (t.detach().double().requires_grad_() for t in (a, b, w))
    results = []
    for name in (backend, "reference"):
        out = moe_lora(x, a, b, w, top_k=k, scaling=16 / 3, router=router, backend=name)
        assert out.delta.dtype == torch.float64
        loss = (out.delta * dy.double()).sum() + (out.stats.prob_sum * c).sum()
        results.append([out.delta] + _grads(loss, [x, a, b]))
    # dx also carries the routing gradient (softmax backward), which every backend computes in float32 by design
    for what, got, want, tol in zip(["out", "dx", "dA", "dB"], *results, [1e-12, 1e-6, 1e-12, 1e-12], strict=True):
        _assert_close(got, want, tol, f"{backend} float64 {what}")
