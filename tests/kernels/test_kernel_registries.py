"""Contract tests of the kernel registries (issue 22.2): every registered backend available here and every
registered layout go through the same checks, so a new entry that breaks the contract fails here.

* backends: for every router a backend implements, output and gradients (x, A, B, router; a loss on the output and
  on the statistics' ``prob_sum``) equal the registered reference op's, in fp32 and under bf16 autocast;
* layouts: on every backend a layout lists, the op equals a per-token float64 loop built from the layout's own
  ``expert_a`` (what each expert reads), with gradients; ``merge_a`` of one-expert groups is the identity.
"""
from __future__ import annotations

import math

import pytest
import torch

from molora_kernels import get_router, moe_lora
from molora_kernels.backends import BACKEND_REGISTRY, Backend, available_backends, register_backend
from molora_kernels.layouts import LAYOUTS, Layout, register_layout

CPU = [b for b in available_backends("cpu")]


def _inputs(layout: Layout, seed=0, T=12, d_in=10, d_out=9, E=4, r=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g).to(dtype).requires_grad_()
    a = (torch.randn(layout.a_rows(E, r), d_in, generator=g) / math.sqrt(d_in)).requires_grad_()
    b = (torch.randn(d_out, E * r, generator=g) / math.sqrt(r)).requires_grad_()
    w = torch.randn(E, d_in, generator=g).requires_grad_()
    return x, a, b, w, torch.randn(T, d_out, generator=g), torch.randn(E, generator=g)


def _loss_and_grads(out, dy, c, tensors):
    loss = (out.delta.float() * dy).sum() + (out.stats.prob_sum * c).sum()
    return [t.detach() for t in torch.autograd.grad(loss, tensors)]


def _routers_of(backend: str) -> list[str]:
    from molora_kernels.routers import ROUTERS

    return [n for n, r in ROUTERS.items() if backend in r.backends and not r.batch_dependent
            and r.name != "hash"]


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("autocast", [False, True])
def test_every_backend_equals_the_reference_for_every_router_it_implements(backend, autocast):
    stacked = LAYOUTS["stacked"]
    routers = _routers_of(backend)
    assert routers, f"backend {backend!r} implements no router"
    for router in routers:
        x, a, b, w, dy, c = _inputs(stacked, seed=len(router))
        opts = {"top_p": 0.7} if router == "topp" else None
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        outs = {}
        for name in (backend, "reference"):
            with ctx:
                out = moe_lora(x, a, b, w, top_k=2, scaling=0.5, router=router, router_options=opts, backend=name)
            outs[name] = (out.delta.detach().float(), _loss_and_grads(out, dy, c, (x, a, b, w)))
        tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outs[backend][0], outs["reference"][0], **tol, msg=f"{router} output")
        for n, got, ref in zip("xabw", outs[backend][1], outs["reference"][1], strict=True):
            torch.testing.assert_close(got.float(), ref.float(), **tol, msg=f"{router} d{n}")


def _per_token(layout: Layout, x, a, b, w, k, scaling, r):
    """y_t = s * sum over the top-k experts e of g_e * B_e (A_e x_t), A_e = layout.expert_a(a, e, r), in float64."""
    E = w.shape[0]
    ys = []
    for t in range(x.shape[0]):
        p = torch.softmax(x[t].double() @ w.double().t(), -1)
        v, idx = torch.topk(p, k)
        gates = v / v.sum()
        y = torch.zeros(b.shape[0], dtype=torch.float64)
        for g, e in zip(gates, idx.tolist(), strict=True):
            a_e = layout.expert_a(a, e, r).double()
            y = y + g * (b[:, e * r:(e + 1) * r].double() @ (a_e @ x[t].double()))
        ys.append(scaling * y)
    assert E == w.shape[0]
    return torch.stack(ys)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_equals_its_per_token_loop_on_every_backend_it_lists(layout):
    lay = LAYOUTS[layout]
    r = 3
    for backend in [b for b in lay.backends if b in CPU]:
        x, a, b, w, dy, _ = _inputs(lay, seed=3, r=r)
        out = moe_lora(x, a, b, w, top_k=2, scaling=0.5, layout=layout, backend=backend)
        want = _per_token(lay, x, a, b, w, 2, 0.5, r)
        torch.testing.assert_close(out.delta.double(), want, rtol=1e-5, atol=1e-6, msg=f"{layout} on {backend}")
        got = torch.autograd.grad((out.delta * dy).sum(), (x, a, b))
        ref = torch.autograd.grad((want * dy.double()).sum(), (x, a, b))
        for n, gg, rr in zip("xab", got, ref, strict=True):
            torch.testing.assert_close(gg.double(), rr.double(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{layout} on {backend}: d{n}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_merges_one_expert_groups_to_itself(layout):
    lay = LAYOUTS[layout]
    E, r = 4, 3
    a = torch.randn(lay.a_rows(E, r), 10)
    merged = lay.merge_a(a, [[e] for e in range(E)], [torch.ones(1, dtype=torch.float64)] * E, r)
    torch.testing.assert_close(merged, a)
    assert lay.shape_problem(a, torch.zeros(5, E * r), E, 10) is None
    assert lay.shape_problem(a, torch.zeros(5, E * r + 1), E, 10) is not None


def test_the_registries_refuse_duplicates_and_unknown_backends():
    with pytest.raises(ValueError, match="already registered"):
        register_backend(BACKEND_REGISTRY["torch"])
    with pytest.raises(ValueError, match="not in molora_kernels.routers.ALL_BACKENDS"):
        register_backend(Backend("cuda-magic", BACKEND_REGISTRY["torch"].run))
    with pytest.raises(ValueError, match="already registered"):
        register_layout(LAYOUTS["stacked"])
    with pytest.raises(ValueError, match="unknown backends"):
        register_layout(Layout("x", "x", False, ("cuda-magic",)))
    for name, lay in LAYOUTS.items():
        assert set(lay.backends) <= set(BACKEND_REGISTRY), name
        assert all(get_router("topk").backends for _ in lay.backends)
