"""`torch.compile(model, fullgraph=True)` of a whole MoLoRA model (issue 20.3).

fullgraph=True turns every graph break into an error, and with dynamo's defaults a host synchronisation
(`.item()`, `.tolist()`) or a data-dependent output shape (`nonzero`, boolean indexing) is a graph break: a model that
traces whole has none of them on that path, so a GPU can capture it in a CUDA graph. The graphs run here with
`aot_eager` (dynamo + AOT autograd, no code generation: what can be traced is what inductor compiles; the benchmark
times inductor), and must give eager's outputs, losses, gradients and router statistics.

Under compile the aux loss and the router regularisers are ordinary differentiable loss terms (eager mode injects
their gradient in backward): the same gradients, checked below against eager.
"""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import molora

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def build(tiny_model, router: str, **kw):
    torch.manual_seed(0)
    base = tiny_model("llama", num_layers=2)
    k = 1 if router in ("hash", "switch") else 2
    cfg = molora.MoLoRAConfig(num_experts="2,4", top_k=k, r=4, router=router, init_weights=False, lora_dropout=0.0,
                              target_modules=TARGETS, aux_loss_coef=0.05, **kw)
    return get_peft_model(base, cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the statistics and the aux loss exclude it
    return ids, mask


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("router,options", [
    ("topk", {"z_loss_coef": 0.01}),
    ("topp", {"entropy_coef": 0.01}),
    ("hash", {}),
    ("noisy_topk", {"noise_std": 0.5, "expert_dropout": 0.2}),  # draws in the graph: same seed, same draws
])
def test_training_step_compiles_whole_with_eager_gradients(tiny_model, router, options):
    model = build(tiny_model, router, router_options=options)
    model.train()
    ids, mask = batch()
    torch.manual_seed(5)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    want, want_summary = grads(model), model.base_model.router_summary()
    assert any("molora_router" in n for n in want), "the routers got no gradient: nothing would be compared"
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got_out = compiled(input_ids=ids, attention_mask=mask, labels=ids)
    got_out.loss.backward()
    got = grads(model)
    torch.testing.assert_close(got_out.loss, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_out.aux_loss.detach(), out.aux_loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # the statistics recorded inside the graph reach the Python side as in eager mode
    summary = model.base_model.router_summary()
    assert set(summary) == set(want_summary)
    for layer, s in want_summary.items():
        assert summary[layer]["load"] == pytest.approx(s["load"], abs=1e-5)


def test_compiled_aux_loss_output_carries_the_gradient_a_trainer_adds(tiny_model):
    """TRL adds `c * outputs.aux_loss` to its objective. Eager mode reports that gradient back through a hook; under
    compile `aux_loss` is differentiable itself: both give the routers the same gradient."""
    model = build(tiny_model, "topk")
    model.train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    (out.loss + 0.3 * out.aux_loss).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got_out = compiled(input_ids=ids, attention_mask=mask, labels=ids)
    assert got_out.aux_loss.requires_grad
    (got_out.loss + 0.3 * got_out.aux_loss).backward()
    got = grads(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("router", ["topk", "soft", "topp", "hash"])
def test_inference_compiles_whole_with_eager_outputs(tiny_model, router):
    model = build(tiny_model, router).eval()
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("router,padded", [("switch", True), ("expert_choice", False)])
def test_capacity_routers_compile_whole_too(tiny_model, router, padded):
    """The capacity routers trace whole as well, expert choice only without padding: with an attention mask its
    capacity is a function of the number of real tokens, a data-dependent shape (README, Limits)."""
    model = build(tiny_model, router)
    model.train()
    ids, mask = batch()
    if not padded:
        mask = None
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    got_out = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=mask,
                                                                         labels=ids)
    got_out.loss.backward()
    got = grads(model)
    torch.testing.assert_close(got_out.loss, out.loss, rtol=1e-5, atol=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_a_fresh_model_compiles_before_any_eager_step_under_bf16_autocast(tiny_model):
    """The routers' functions were imported on first use; on a model compiled before any eager backward that first
    use was inside the trace, where dynamo refuses `importlib` (fullgraph failed in the first backward). Attaching a
    router now imports them. Checked from an emptied function cache, compiled first, under bf16 autocast."""
    from molora_kernels import get_router

    get_router("topk")._cache.clear()
    model = build(tiny_model, "topk")
    model.train()
    ids, mask = batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_out = compiled(input_ids=ids, attention_mask=mask, labels=ids)
    got_out.loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    want = grads(model)
    torch.testing.assert_close(got_out.loss, out.loss, rtol=1e-3, atol=1e-3)
    assert set(got) == set(want) and any("molora_router" in n for n in got)
    for n in want:  # bf16 matmuls: the same graph in both, so the same round-off up to op order
        torch.testing.assert_close(got[n], want[n], rtol=2e-2, atol=1e-3, msg=lambda m, n=n: f"{n}: {m}")
