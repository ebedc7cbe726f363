"""Triton kernels (routing, fused MoE-LoRA forward/backward) against the torch reference, on CPU.

The kernels run under the Triton interpreter, which ``@triton.jit`` selects from ``TRITON_INTERPRET``
when our kernel modules are imported. To be independent of what other test modules imported before
(and to not switch the whole pytest process to the interpreter, which would change what
``is_triton_available`` says to every other test), a plain ``pytest`` run executes this file once more
in a subprocess with ``TRITON_INTERPRET=1`` set before anything imports triton; the tests run there,
and the parent reports the child's result as one test. ``TRITON_INTERPRET=1 pytest tests/...`` runs
them in-process directly. In the parent (non-interpreter) process every kernel is also compiled for a
Hopper GPU (sm_90, bf16 dots) with triton's own compiler and ptxas: no GPU needed to generate code.

Reference = ``molora_kernels.routing.route`` + ``molora_kernels.torch_dense`` in float32 on the same
(already rounded) inputs: the kernels accumulate in fp32, so bf16/fp16 inputs are compared with the
fp32 math on those inputs (bf16 operands are upcast in-kernel under the interpreter).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
try:
    import molora_kernels  # noqa: F401
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(KERNELS_DIR))

_HAVE_TRITON = True
try:
    import triton  # noqa: F401
except Exception:
    _HAVE_TRITON = False

_ENV_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if _ENV_INTERPRET and _HAVE_TRITON:
    from molora_kernels import triton_routing

    # Our kernels may have been built before the variable was set (imported by another test module).
    _IN_PROCESS = triton_routing.INTERPRET
else:
    _IN_PROCESS = False

interp = pytest.mark.skipif(
    not _IN_PROCESS,
    reason="interpreter tests run in the subprocess of test_kernels_under_interpreter"
    if not _ENV_INTERPRET else "the Triton kernels were imported before TRITON_INTERPRET=1 was set",
)


@pytest.mark.skipif(not _HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(_IN_PROCESS, reason="already running under the interpreter")
def test_kernels_under_interpreter():
    """Run this file in a fresh interpreter-mode process (one subprocess per invocation)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(KERNELS_DIR), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider", "-rs"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "interpreter tests failed:\n" + out[-20000:]
    assert " passed" in out and " failed" not in out, out[-5000:]


# --------------------------------------------------------------------------------------------------
# GPU code generation: every kernel compiles to a Hopper (sm_90) cubin, no GPU needed
# --------------------------------------------------------------------------------------------------

def _hopper_cases():
    """(kernel name, pointer dtypes, constexprs) of the bf16 training path, the one the interpreter
    cannot run natively (bf16 tl.dot -> wgmma)."""
    b, f, i = "*bf16", "*fp32", "*i64"
    bf16 = "bf16"  # resolved to tl.bfloat16 in the test
    return {
        "route_fwd": ("triton_routing", dict(logits_ptr=b, gates_ptr=f, probs_ptr=f, idx_ptr=i),
                      dict(TOP_K=2, SOFT=False, BLOCK_E=8)),
        "route_bwd": ("triton_routing", dict(d_gates_ptr=f, d_probs_ptr=f, gates_ptr=f, probs_ptr=f, d_logits_ptr=b),
                      dict(HAS_DGATES=True, HAS_DPROBS=True, SOFT=False, BLOCK_E=8)),
        "shrink_route": ("triton_moe_lora", dict(x_ptr=b, xd_ptr=b, a_ptr=b, w_ptr=b, h_ptr=f, gates_ptr=f, probs_ptr=f,
                                                 idx_ptr=i),
                         dict(HAS_DROPOUT=True, TOP_K=2, SOFT=False, CDT=bf16, PREC="ieee", BLOCK_R=64, BLOCK_E=16)),
        "gate_expand": ("triton_moe_lora", dict(h_ptr=f, gates_ptr=f, b_ptr=b, out_ptr=b),
                        dict(CDT=bf16, PREC="ieee", BLOCK_R=64)),
        "bwd_gate": ("triton_moe_lora", dict(dy_ptr=b, b_ptr=b, h_ptr=f, gates_ptr=f, probs_ptr=f, d_gates_ptr=f,
                                             d_probs_ptr=f, dhl_ptr=f),
                     dict(HAS_DGATES=True, HAS_DPROBS=True, SOFT=False, CDT=bf16, PREC="ieee", BLOCK_R=64,
                          BLOCK_E=16)),
        "dx": ("triton_moe_lora", dict(dhl_ptr=f, a_ptr=b, w_ptr=b, dx_ptr=b, dxd_ptr=b),
               dict(SPLIT=True, CDT=bf16, PREC="ieee", BLOCK_R=64, BLOCK_E=16)),
        "wgrad": ("triton_moe_lora", dict(g_ptr=b, x_ptr=f, gates_ptr=f, out_ptr=f),
                  dict(GATE_X=True, CDT=bf16, PREC="ieee")),
    }


@pytest.mark.skipif(not _HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(_ENV_INTERPRET, reason="TRITON_INTERPRET=1: kernels are interpreted, not compiled")
@pytest.mark.parametrize("name", list(_hopper_cases()))
def test_kernel_compiles_for_hopper(name):
    """Front end, MLIR passes and ptxas for sm_90 with the first GPU autotune config (bf16 dots)."""
    import importlib

    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, ptrs, constexprs = _hopper_cases()[name]
    module = importlib.import_module(f"molora_kernels.{module_name}")
    if module.INTERPRET:
        pytest.skip("the kernels were imported under TRITON_INTERPRET=1 in this process")
    kernel = getattr(module, f"_{name}_kernel")
    cfg = kernel.configs[0]
    consts = {k: (tl.bfloat16 if v == "bf16" else v) for k, v in dict(constexprs, **cfg.kwargs).items()}
    jit = kernel.fn
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in ("scaling", "scale") else "i32")
           for n in jit.arg_names}
    compiled = triton.compile(ASTSource(jit, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                           enable_fp_fusion=True))
    assert compiled.asm.get("cubin")
    assert compiled.metadata.shared <= 227 * 1024  # fits an H100 SM


# --------------------------------------------------------------------------------------------------
# Everything below runs under the interpreter
# --------------------------------------------------------------------------------------------------

def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def _tol(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]


# ---- routing -------------------------------------------------------------------------------------

ROUTE_CASES = [
    # (leading shape, E, k, router, logits dtype)
    ((70,), 8, 2, "topk", torch.float32),   # T not a multiple of the block
    ((33,), 3, 1, "topk", torch.float32),
    ((2, 9), 5, 3, "topk", torch.float32),  # leading dims
    ((5,), 4, 4, "topk", torch.float32),    # E == k: gates == probs
    ((40,), 6, 2, "soft", torch.float32),
    ((7,), 1, 1, "topk", torch.float32),    # E = 1
    ((50,), 8, 2, "topk", torch.bfloat16),
    ((50,), 8, 2, "topk", torch.float16),
]


@interp
@pytest.mark.parametrize("lead,E,k,router,dtype", ROUTE_CASES)
def test_route_matches_reference(lead, E, k, router, dtype):
    from molora_kernels.routing import load_balancing_loss, route, routing_stats
    from molora_kernels.triton_routing import route_triton

    torch.manual_seed(0)
    logits = (2.0 * torch.randn(*lead, E)).to(dtype)
    lt = logits.clone().requires_grad_()
    lr = logits.float().clone().requires_grad_()
    rt = route_triton(lt, k, router)
    r2 = route(lr.reshape(-1, E), k, router)  # the reference takes [T, E] (its scatter is along dim 1)
    rr = type(r2)(*(t.reshape(*lead, t.shape[-1]) for t in (r2.gates, r2.probs, r2.topk_idx)))

    torch.testing.assert_close(rt.probs, rr.probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rt.gates, rr.gates, rtol=1e-6, atol=1e-7)
    assert rt.gates.dtype == rt.probs.dtype == torch.float32
    assert torch.equal(rt.topk_idx, rr.topk_idx)

    w_g, w_p = torch.randn(*lead, E), torch.randn(*lead, E)

    def loss(r):  # downstream use of the gates + the aux loss and another use of the probs
        stats = routing_stats(
            type(r)(r.gates.reshape(-1, E), r.probs.reshape(-1, E), r.topk_idx.reshape(-1, r.topk_idx.shape[-1])))
        return (r.gates * w_g).sum() + (r.probs * w_p).sum() + 10.0 * load_balancing_loss([stats], k)

    loss(rt).backward()
    loss(rr).backward()
    assert lt.grad.dtype == dtype
    ref = lr.grad.to(dtype).float()  # the reference gradient rounded like ours
    assert _rel_err(lt.grad, ref) <= max(_tol(dtype), 1e-5), (lt.grad, ref)


@interp
def test_route_grad_through_probs_only_and_empty():
    from molora_kernels.routing import route
    from molora_kernels.triton_routing import route_triton

    torch.manual_seed(1)
    lt = torch.randn(37, 6, requires_grad=True)
    lr = lt.detach().clone().requires_grad_()
    (route_triton(lt, 2).probs ** 2).sum().backward()  # gates unused: their gradient is None
    (route(lr, 2).probs ** 2).sum().backward()
    torch.testing.assert_close(lt.grad, lr.grad, rtol=1e-5, atol=1e-7)

    empty = route_triton(torch.zeros(0, 4), 2)
    assert empty.gates.shape == (0, 4) and empty.topk_idx.shape == (0, 2)
    with pytest.raises(ValueError):
        route_triton(torch.zeros(3, 4), 5)
    with pytest.raises(ValueError):
        route_triton(torch.zeros(3, 4), 1, router="hash")


# ---- fused MoE-LoRA ------------------------------------------------------------------------------

def _reference(x, a, b, w, *, top_k, scaling, router, dropout=0.0, training=False):
    from molora_kernels import torch_dense
    from molora_kernels.routing import route

    h, logits = torch_dense.shrink_and_logits(x, a, w, dropout, training)
    r = route(logits, top_k, router)
    return torch_dense.gate_expand(h, r.gates, b, scaling), r


def _run_case(T, d_in, d_out, E, r, k, router="topk", x_dtype=torch.float32, p_dtype=None,
              dropout=0.0, dead_expert=False, seed=0, x_view=False):
    """Forward + backward of the kernels and of the fp32 reference on the same inputs; compare all."""
    from molora_kernels.routing import load_balancing_loss, routing_stats
    from molora_kernels.triton_moe_lora import moe_lora_triton

    p_dtype = p_dtype or x_dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    a = torch.randn(E * r, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, E * r, generator=g) / (E * r) ** 0.5
    w = torch.randn(E, d_in, generator=g) / d_in ** 0.5
    if dead_expert:  # a constant feature and a router row that makes expert E-1 lose every top-k
        x[:, 0] = 1.0
        w[E - 1] = 0.0
        w[E - 1, 0] = -30.0
    x, a, b, w = x.to(x_dtype), a.to(p_dtype), b.to(p_dtype), w.to(p_dtype)
    if x_view:  # non-contiguous activations and weights
        x = x.t().contiguous().t()
        b = b.t().contiguous().t()
    mine = [t.clone().requires_grad_() for t in (x, a, b, w)]
    ref = [t.detach().float().clone().requires_grad_() for t in (x, a, b, w)]
    scaling = 1.7

    torch.manual_seed(seed + 1)  # same dropout mask on both sides
    delta, rt = moe_lora_triton(mine[0], *mine[1:], top_k=k, scaling=scaling, dropout=dropout,
                                training=dropout > 0, router=router)
    torch.manual_seed(seed + 1)
    delta_ref, rr = _reference(*ref, top_k=k, scaling=scaling, router=router, dropout=dropout,
                               training=dropout > 0)

    tol = _tol(x_dtype if p_dtype == x_dtype else torch.bfloat16 if torch.bfloat16 in (x_dtype, p_dtype)
               else torch.float16 if torch.float16 in (x_dtype, p_dtype) else torch.float32)
    assert delta.dtype == x_dtype and delta.shape == (T, d_out)
    assert _rel_err(delta, delta_ref) <= tol
    assert torch.equal(rt.topk_idx, rr.topk_idx)
    torch.testing.assert_close(rt.probs, rr.probs, rtol=1e-4 if x_dtype != torch.float32 else 1e-5, atol=1e-6)
    torch.testing.assert_close(rt.gates, rr.gates, rtol=1e-4 if x_dtype != torch.float32 else 1e-5, atol=1e-6)
    if dead_expert:
        assert routing_stats(rr).counts[E - 1] == 0

    gy = torch.randn(T, d_out, generator=g)
    gp = torch.randn(T, E, generator=g)
    gg = torch.randn(T, E, generator=g)

    def loss(d, rout):  # through delta, the aux loss, and direct uses of the probs and the gates
        aux = load_balancing_loss([routing_stats(rout)], k)
        return (d.float() * gy).sum() + (rout.probs * gp).sum() + (rout.gates * gg).sum() + 5.0 * aux

    loss(delta, rt).backward()
    loss(delta_ref, rr).backward()
    for name, mt, rf in zip(("x", "a_all", "b_all", "router_weight"), mine, ref, strict=True):
        assert mt.grad is not None and mt.grad.dtype == mt.dtype, name
        err = _rel_err(mt.grad, rf.grad)
        assert err <= 2 * tol, f"d{name}: relative error {err:.2e}"
    return mine


MOE_CASES = {
    # name: kwargs of _run_case
    "ragged_E3_r5": dict(T=70, d_in=48, d_out=40, E=3, r=5, k=2),
    "dead_expert": dict(T=33, d_in=20, d_out=24, E=8, r=4, k=2, dead_expert=True),
    "E_eq_k": dict(T=17, d_in=16, d_out=16, E=4, r=4, k=4),
    "E1_lora": dict(T=9, d_in=8, d_out=8, E=1, r=3, k=1),
    "soft": dict(T=20, d_in=24, d_out=16, E=6, r=2, k=1, router="soft"),
    "top1_r1": dict(T=41, d_in=32, d_out=12, E=5, r=1, k=1),
    "noncontiguous": dict(T=35, d_in=24, d_out=20, E=4, r=3, k=2, x_view=True),
    "dropout": dict(T=30, d_in=24, d_out=20, E=4, r=4, k=2, dropout=0.3),
    "dropout_soft": dict(T=19, d_in=16, d_out=16, E=3, r=2, k=1, router="soft", dropout=0.5),
    "fp16": dict(T=40, d_in=32, d_out=32, E=4, r=4, k=2, x_dtype=torch.float16),
    "bf16": dict(T=40, d_in=32, d_out=32, E=4, r=4, k=2, x_dtype=torch.bfloat16),
    "bf16_ragged": dict(T=45, d_in=40, d_out=24, E=3, r=5, k=2, x_dtype=torch.bfloat16),
    "bf16_x_fp32_params": dict(T=40, d_in=32, d_out=32, E=4, r=4, k=2, x_dtype=torch.bfloat16,
                               p_dtype=torch.float32),
}


@interp
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_lora_matches_reference(case):
    _run_case(**MOE_CASES[case])


@interp
def test_moe_lora_several_rank_tiles(monkeypatch):
    """E·r larger than one register tile: the kernels loop over several BLOCK_R tiles."""
    from molora_kernels import triton_moe_lora

    monkeypatch.setattr(triton_moe_lora, "MAX_BLOCK_R", 16)
    _run_case(T=50, d_in=24, d_out=20, E=8, r=5, k=3)  # E·r = 40: tiles of 16, the last one ragged


@interp
def test_moe_lora_deterministic_and_partial_sums():
    """Two backward passes give bit-identical gradients; the token reduction uses several splits."""
    from molora_kernels import triton_moe_lora

    splits, _ = triton_moe_lora._token_splits(70, 19, 48, torch.device("cpu"))
    assert splits > 1
    first = _run_case(T=70, d_in=48, d_out=40, E=4, r=4, k=2, seed=3)
    second = _run_case(T=70, d_in=48, d_out=40, E=4, r=4, k=2, seed=3)
    for p, q in zip(first, second, strict=True):
        assert torch.equal(p.grad, q.grad)


@interp
def test_moe_lora_partial_gradients():
    """Only the router used (delta ignored), frozen input, frozen B: the skipped paths still agree."""
    from molora_kernels.routing import load_balancing_loss, routing_stats
    from molora_kernels.triton_moe_lora import moe_lora_triton

    torch.manual_seed(5)
    T, d_in, d_out, E, r, k = 29, 16, 12, 4, 2, 2
    x = torch.randn(T, d_in)
    a, b, w = torch.randn(E * r, d_in) / 4, torch.randn(d_out, E * r) / 3, torch.randn(E, d_in) / 4
    wt, wr = w.clone().requires_grad_(), w.clone().requires_grad_()
    at, ar = a.clone().requires_grad_(), a.clone().requires_grad_()
    _, rt = moe_lora_triton(x, at, b, wt, top_k=k, scaling=2.0)
    _, rr = _reference(x, ar, b, wr, top_k=k, scaling=2.0, router="topk")
    load_balancing_loss([routing_stats(rt)], k).backward()
    load_balancing_loss([routing_stats(rr)], k).backward()
    torch.testing.assert_close(wt.grad, wr.grad, rtol=1e-5, atol=1e-8)
    assert at.grad is None or not at.grad.any()  # no path from the aux loss to A

    # frozen x and B, loss through delta: gradients reach A and the router only
    at.grad = wt.grad = None
    ar.grad = wr.grad = None
    delta, _ = moe_lora_triton(x, at, b, wt, top_k=k, scaling=2.0)
    delta_ref, _ = _reference(x, ar, b, wr, top_k=k, scaling=2.0, router="topk")
    gy = torch.randn(T, d_out)
    (delta * gy).sum().backward()
    (delta_ref * gy).sum().backward()
    assert _rel_err(at.grad, ar.grad) < 2e-5 and _rel_err(wt.grad, wr.grad) < 2e-5

    # delta.sum(): the incoming gradient is an expanded (stride 0) tensor
    at.grad = wt.grad = ar.grad = wr.grad = None
    moe_lora_triton(x, at, b, wt, top_k=k, scaling=2.0)[0].sum().backward()
    _reference(x, ar, b, wr, top_k=k, scaling=2.0, router="topk")[0].sum().backward()
    assert _rel_err(at.grad, ar.grad) < 2e-5 and _rel_err(wt.grad, wr.grad) < 2e-5


@interp
def test_moe_lora_empty_and_errors():
    from molora_kernels.triton_moe_lora import moe_lora_triton

    a = torch.randn(6, 8, requires_grad=True)
    delta, rt = moe_lora_triton(torch.zeros(0, 8), a, torch.randn(4, 6), torch.randn(3, 8), top_k=2, scaling=1.0)
    assert delta.shape == (0, 4) and rt.gates.shape == (0, 3) and rt.topk_idx.shape == (0, 2)
    delta.sum().backward()
    assert a.grad is not None and not a.grad.any()
    with pytest.raises(ValueError):
        moe_lora_triton(torch.zeros(3, 8), a, torch.randn(4, 6), torch.randn(3, 8), top_k=4, scaling=1.0)
    with pytest.raises(ValueError):
        moe_lora_triton(torch.zeros(3, 7), a, torch.randn(4, 6), torch.randn(3, 8), top_k=1, scaling=1.0)


@interp
def test_availability():
    from molora_kernels import triton_moe_lora, triton_routing

    assert triton_routing.is_triton_available("cpu") and triton_routing.is_triton_available(torch.device("cpu"))
    assert triton_moe_lora.is_triton_available is triton_routing.is_triton_available


@interp
def test_import_without_triton():
    """The modules import (and report unavailability) where triton is missing."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from molora_kernels import triton_moe_lora as m, triton_routing as r\n"
        "assert not m.HAS_TRITON and not r.is_triton_available('cuda') and not r.is_triton_available('cpu')\n"
        "import torch\n"
        "try:\n"
        "    m.moe_lora_triton(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 2), torch.zeros(1, 4),"
        " top_k=1, scaling=1.0)\n"
        "except RuntimeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(KERNELS_DIR), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_single_config_prunes_every_autotuned_kernel_to_its_first_config():
    """gpu_check's correctness section compiles one config per kernel (MOLORA_TRITON_AUTOTUNE=0 does the same)."""
    from molora_kernels import triton_moe_lora, triton_routing
    from molora_kernels.triton_routing import AUTOTUNE_PRUNE, single_config

    tuners = [v for mod in (triton_moe_lora, triton_routing) for v in vars(mod).values()
              if type(v).__name__ == "Autotuner"]
    assert len(tuners) == 7
    for t in tuners:
        assert t.early_config_prune is AUTOTUNE_PRUNE["early_config_prune"]
    configs = ["a", "b", "c"]
    assert AUTOTUNE_PRUNE["early_config_prune"](configs, {}) == configs
    with single_config():
        assert AUTOTUNE_PRUNE["early_config_prune"](configs, {}) == ["a"]
    assert AUTOTUNE_PRUNE["early_config_prune"](configs, {}) == configs
