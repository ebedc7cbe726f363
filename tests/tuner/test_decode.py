"""The inference path (issue 20.2): eval mode + no_grad + no statistics -> molora_kernels.decode. Checked against
the training path and the plain reference on fresh random inputs, for every router, in fp32 and under bf16/fp16
autocast, with and without sibling sharing, and after weights are written in place (``param.data`` included)."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from molora import MoLoRAConfig
from molora_kernels import moe_lora
from molora_kernels.decode import DecodeMember, decode

ROUTERS = [("topk", 2, None), ("soft", 2, None), ("topp", 3, {"top_p": 0.6}), ("switch", 1, {"capacity_factor": 0.5}),
           ("expert_choice", 1, {"capacity_factor": 1.5}), ("hash", 1, None)]
IDS = [r[0] for r in ROUTERS]


def _weights(seed, d_in=24, experts=(4, 3), r=2, d_out=(20, 12)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(e * r, d_in, generator=g) * 0.3, torch.randn(do, e * r, generator=g) * 0.3,
             torch.randn(e, d_in, generator=g)) for e, do in zip(experts, d_out, strict=True)]


@pytest.mark.parametrize("router,k,opts", ROUTERS, ids=IDS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_decode_matches_the_reference_at_inference(router, k, opts, dtype):
    """Each module's output equals the reference backend's (training=False), with and without a base to add to."""
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 500, (7,), generator=torch.Generator().manual_seed(2)) if router == "hash" else None
    ws = _weights(3)
    base = torch.randn(7, 20, generator=torch.Generator().manual_seed(4))
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        want = [moe_lora(x, a, b, w, top_k=min(k, w.shape[0]), scaling=0.75, router=router, router_options=opts,
                         backend="reference", token_ids=ids).delta for a, b, w in ws]
    dt = dtype or torch.float32
    got = [decode(x.to(dt), a, b, w, DecodeMember.of(w.shape[0], min(k, w.shape[0]), 0.75, router, opts), ids,
                  base=base.to(dt) if i == 0 else None) for i, (a, b, w) in enumerate(ws)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is None else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0].float(), (base.to(dt) + want[0].to(dt)).float(), **tol)
    torch.testing.assert_close(got[1].float(), want[1].float(), **tol)
    assert got[0].dtype == dt


def _model(tiny_model, router, k, opts, **kw):
    torch.manual_seed(0)
    return get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts=[4, 3], top_k=k, r=2, router=router, router_options=opts, init_weights=False, **kw))


@pytest.mark.parametrize("router,k,opts", ROUTERS, ids=IDS)
@pytest.mark.parametrize("share", [True, False])
def test_model_inference_path_equals_the_training_path(tiny_model, router, k, opts, share):
    """Eval + no_grad takes the inference path (statistics off by default); asking for statistics takes the
    training path: the same logits, and the same greedy generation with a KV cache."""
    model = _model(tiny_model, router, k, opts, share_sibling_shrink=share)
    model.eval()
    tuner = model.base_model
    ids = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        assert tuner.router_summary() == {}
        assert any("_decode_plan" in vars(m) for m in model.modules()), "the inference path did not run"
        tuner.record_router_stats = True
        slow = model(input_ids=ids).logits
        assert tuner.router_summary()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        want = model.generate(input_ids=ids[:2, :4], max_new_tokens=4, do_sample=False)
        tuner.record_router_stats = None
        got = model.generate(input_ids=ids[:2, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_inference_path_under_autocast(tiny_model, dtype):
    model = _model(tiny_model, "topk", 2, None)
    model.eval()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        fast = model(input_ids=ids).logits
        model.base_model.record_router_stats = True
        slow = model(input_ids=ids).logits
    torch.testing.assert_close(fast.float(), slow.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("how", ["in place", ".data"])
def test_weights_written_in_place_are_seen_and_gradient_forwards_train(tiny_model, how):
    """A weight changed between forwards -- by an in-place op or through ``param.data`` (which no version counter
    sees; a cached copy of the weights went stale there) -- reaches the next inference forward; an eval-mode
    forward with gradients takes the training path and reaches the adapter weights."""
    model = _model(tiny_model, "topk", 2, None)
    model.eval()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for n, p in model.named_parameters():
            if "molora_A" in n or "molora_router" in n:
                if how == ".data":
                    p.data[:1] = p.data[:1] * 3.0
                else:
                    p.mul_(1.5)
        after = model(input_ids=ids).logits
        model.base_model.record_router_stats = True
        want = model(input_ids=ids).logits
        model.base_model.record_router_stats = None
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    out = model(input_ids=ids).logits
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "molora_A" in n)


def test_shared_a_layout_and_a_forced_backend_take_the_training_path(tiny_model):
    for kw in ({"layout": "shared_a"}, {"backend": "reference"}):
        model = _model(tiny_model, "topk", 2, None, **kw)
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.randint(3, 64, (1, 5)))
        assert not any("_decode_plan" in vars(m) for m in model.modules()), kw
