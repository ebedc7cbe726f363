"""Every backend under autocast (bf16, fp16) and with low-precision activations and fp32 adapters.

The reference is the plain formula (backend ``"reference"``, autograd) run *without* autocast on the inputs
and weights explicitly cast to the low-precision dtype: that is what autocast means for a matmul. Each
backend must give its result within the dtype's tolerance, forward and gradients (to x and to the fp32
adapter parameters), whether ``backward()`` runs inside or outside the autocast region (the Trainer calls it
outside; a hand-written backward must not depend on that).
"""
from __future__ import annotations

import zlib

import pytest
import torch

from molora_kernels import moe_lora

BACKENDS = ["torch", "reference", "sparse", "auto"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.bfloat16: 5e-2, torch.float16: 8e-3}


def _leaves(seed, T=48, d_in=32, d_out=24, E=4, r=4, x_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g).to(x_dtype).requires_grad_()
    a = (torch.randn(E * r, d_in, generator=g) / d_in ** 0.5).requires_grad_()
    b = (torch.randn(d_out, E * r, generator=g) / r ** 0.5).requires_grad_()
    w = (torch.randn(E, d_in, generator=g) / d_in ** 0.5).requires_grad_()
    dy = torch.randn(T, d_out, generator=g)
    c = torch.randn(T, E, generator=g)
    return x, a, b, w, dy, c


def _loss(out, dy, c):
    return (out.delta.float() * dy).sum() + (out.routing.probs.float() * c).sum()


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _close(actual, expected, tol, what):
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() + 1e-6
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def _reference(x, a, b, w, dt, *, dropout, seed, **kw):
    torch.manual_seed(seed)
    return moe_lora(x.to(dt), a.to(dt), b.to(dt), w.to(dt), dropout=dropout, training=True, backend="reference",
                    **kw)


@pytest.mark.parametrize("backward_inside", [False, True], ids=["bwd-outside", "bwd-inside"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p.1"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_under_autocast(backend, dtype, dropout, backward_inside):
    seed = zlib.crc32(f"{backend}{dtype}{dropout}{backward_inside}".encode()) % 10_000
    x, a, b, w, dy, c = _leaves(seed)
    kw = dict(top_k=2, scaling=2.0, router="topk")
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype):
        out = moe_lora(x, a, b, w, dropout=dropout, training=True, backend=backend, **kw)
        if backward_inside:
            got = _grads(_loss(out, dy, c), (x, a, b, w))
    if not backward_inside:
        got = _grads(_loss(out, dy, c), (x, a, b, w))
    assert out.delta.dtype == dtype, "autocast computes the adapter in the autocast dtype"
    assert out.routing.probs.dtype == torch.float32, "routing softmax stays fp32"

    ref = _reference(x, a, b, w, dtype, dropout=dropout, seed=seed, **kw)
    want = _grads(_loss(ref, dy, c), (x, a, b, w))
    assert torch.equal(out.routing.topk_idx, ref.routing.topk_idx)
    tol = TOL[dtype]
    _close(out.delta, ref.delta, tol, "output")
    for name, g, r in zip(("dx", "dA", "dB", "dW_router"), got, want, strict=True):
        assert g.dtype == (x.dtype if name == "dx" else torch.float32), name
        _close(g, r, tol, name)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_activations_fp32_adapters(backend, dtype):
    """A bf16/fp16 model (activations in that dtype) with fp32 adapter parameters, no autocast."""
    seed = zlib.crc32(f"lp{backend}{dtype}".encode()) % 10_000
    x, a, b, w, dy, c = _leaves(seed, x_dtype=dtype)
    base = torch.randn(x.shape[0], 24).to(dtype)
    kw = dict(top_k=2, scaling=2.0, router="topk")
    out = moe_lora(x, a, b, w, backend=backend, base=base, **kw)
    assert out.delta.dtype == dtype
    got = _grads(_loss(out, dy, c), (x, a, b, w))
    ref = moe_lora(x, a.to(dtype), b.to(dtype), w.to(dtype), backend="reference", base=base, **kw)
    want = _grads(_loss(ref, dy, c), (x, a, b, w))
    _close(out.delta, ref.delta, TOL[dtype], "output")
    for name, g, r in zip(("dx", "dA", "dB", "dW_router"), got, want, strict=True):
        assert g.dtype == (dtype if name == "dx" else torch.float32), name
        _close(g, r, TOL[dtype], name)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_layer_in_model_under_autocast(tiny_model, dtype):
    """A whole MoLoRA model (aux loss on) trains a step under CPU autocast with the default backend."""
    from peft import get_peft_model

    from molora import MoLoRAConfig

    model = tiny_model("llama", num_layers=2)
    cfg = MoLoRAConfig(num_experts="2,4", top_k=2, r=4, lora_dropout=0.05, aux_loss_coef=0.01,
                       init_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    ids = torch.randint(0, 64, (2, 12))
    with torch.autocast("cpu", dtype=dtype):
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
