"""The router registry (issue 10): properties instead of name comparisons, and a router added by a test with one
registry entry plus its reference -- checked against a plain per-token computation, with gradients, through the
op's backends and a whole model."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from molora import AllocationError, MoLoRAConfig
from molora_kernels import ROUTERS, Router, get_router, moe_lora, register_router
from molora_kernels.ops import resolve_backend
from molora_kernels.routing import route_topk, topk_logits_grad

TEMPERATURE = 2.0


def route_tempered(logits, top_k):
    """Test router: the MoLA router on logits / 2 (a softer softmax)."""
    return route_topk(logits.float() / TEMPERATURE, top_k)


def tempered_logits_grad(dgates, dprobs, probs, idx, top_k):
    return topk_logits_grad(dgates, dprobs, probs, idx, top_k) / TEMPERATURE


@pytest.fixture
def tempered():
    r = register_router(Router("tempered", "test: top-k on logits / 2", route_fn=route_tempered,
                               logits_grad_fn=tempered_logits_grad, selects_top_k=True, aux_loss="mola",
                               backends=("torch", "reference")))
    yield r
    ROUTERS.pop("tempered")


@pytest.fixture
def autograd_only():
    r = register_router(Router("tempered-ag", "test: autograd only", route_fn=route_tempered, logits_grad_fn=None,
                               selects_top_k=True, aux_loss=None, backends=("reference",)))
    yield r
    ROUTERS.pop("tempered-ag")


def test_builtin_routers_state_what_the_rest_may_assume():
    topk, soft = get_router("topk"), get_router("soft")
    assert topk.selects_top_k and topk.aux_loss == "mola" and "triton" in topk.backends
    assert not soft.selects_top_k and soft.aux_loss is None
    assert soft.gates_are_probs(1, 4) and topk.gates_are_probs(4, 4) and not topk.gates_are_probs(2, 4)
    assert soft.effective_top_k(1, 6) == 6 and topk.effective_top_k(2, 6) == 2
    with pytest.raises(ValueError, match=r"router='nope' is not a known router; allowed: topk, soft"):
        get_router("nope")


def _naive(x, a, b, w, k, scaling):
    """Per token: softmax(x W^T / 2), top-k, renormalise, sum of the chosen experts' LoRA outputs."""
    num_experts = w.shape[0]
    r = a.shape[0] // num_experts
    out = []
    for t in range(x.shape[0]):
        p = torch.softmax((x[t] @ w.t()) / TEMPERATURE, -1)
        v, i = torch.topk(p, k)
        g = v / v.sum()
        y = sum(g[j] * (b[:, i[j] * r:(i[j] + 1) * r] @ (a[i[j] * r:(i[j] + 1) * r] @ x[t])) for j in range(k))
        out.append(scaling * y)
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_a_registered_router_matches_its_reference_with_gradients(tempered, backend):
    g = torch.Generator().manual_seed(0)
    T, d_in, d_out, E, r, k = 9, 12, 10, 4, 3, 2
    x = torch.randn(T, d_in, generator=g, requires_grad=True)
    a = torch.randn(E * r, d_in, generator=g, requires_grad=True)
    b = torch.randn(d_out, E * r, generator=g, requires_grad=True)
    w = torch.randn(E, d_in, generator=g, requires_grad=True)
    up = torch.randn(T, d_out, generator=g)
    c = torch.randn(E, generator=g)  # weights on the statistics' prob_sum (what the aux loss differentiates)
    out = moe_lora(x, a, b, w, top_k=k, scaling=0.5, router="tempered", backend=backend)
    want = _naive(x, a, b, w, k, 0.5)
    want_prob_sum = torch.softmax((x @ w.t()) / TEMPERATURE, -1).sum(0)
    torch.testing.assert_close(out.delta, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats.prob_sum, want_prob_sum, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad((out.delta * up).sum() + (out.stats.prob_sum * c).sum(), (x, a, b, w))
    want_grads = torch.autograd.grad((want * up).sum() + (want_prob_sum * c).sum(), (x, a, b, w))
    for name, gg, ww in zip("xabw", got_grads, want_grads):
        torch.testing.assert_close(gg, ww, rtol=1e-4, atol=1e-5, msg=name)


def test_backends_without_the_router_are_skipped_by_auto_and_refused_by_name(tempered, autograd_only):
    x, a, b, w = torch.randn(64, 8), torch.randn(16, 8), torch.randn(6, 16), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"backend 'sparse' does not implement router 'tempered'; backends for "
                                         r"it: torch, reference"):
        moe_lora(x, a, b, w, top_k=2, scaling=1.0, router="tempered", backend="sparse")
    with pytest.raises(ValueError, match=r"backend 'torch' does not implement router 'tempered-ag'"):
        moe_lora(x, a, b, w, top_k=2, scaling=1.0, router="tempered-ag", backend="torch")
    for tokens in (4, 4096):  # small and large: whatever the cost model prefers, auto stays inside the router's list
        xt = torch.randn(tokens, 8)
        assert resolve_backend("auto", xt, a, b, w, 2, "tempered") in ("torch", "reference")
        assert resolve_backend("auto", xt, a, b, w, 2, "tempered-ag") == "reference"
    out = moe_lora(x, a, b, w, top_k=2, scaling=1.0, router="tempered-ag", backend="auto")
    torch.testing.assert_close(out.delta, _naive(x, a, b, w, 2, 1.0), rtol=1e-5, atol=1e-5)


def test_registration_errors_name_the_value():
    base = dict(summary="", route_fn=route_tempered, logits_grad_fn=tempered_logits_grad, selects_top_k=True,
                aux_loss=None)
    with pytest.raises(ValueError, match="a router named 'topk' is already registered"):
        register_router(Router("topk", **base))
    with pytest.raises(ValueError, match=r"unknown backends \['cuda'\]"):
        register_router(Router("x1", **base, backends=("cuda",)))
    with pytest.raises(ValueError, match="aux_loss='switch'; known: mola or None"):
        register_router(Router("x2", **{**base, "aux_loss": "switch"}))
    with pytest.raises(ValueError, match="no hand-written backward, so only the 'reference' backend"):
        register_router(Router("x3", **{**base, "logits_grad_fn": None}))
    assert not {"x1", "x2", "x3"} & set(ROUTERS)


def test_a_registered_router_trains_a_model_with_its_properties(tiny_model, tempered):
    base = tiny_model("llama", num_layers=2)
    model = get_peft_model(base, MoLoRAConfig(num_experts=4, top_k=2, r=2, router="tempered", aux_loss_coef=0.1,
                                              init_weights=False))
    model.train()
    ids = torch.randint(0, 64, (2, 6))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None  # aux_loss="mola": the MoLA loss is added
    out.loss.backward()
    routers = [p for n, p in model.named_parameters() if "molora_router" in n]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    with pytest.raises(AllocationError, match=r"backend='sparse' does not implement router='tempered'; backends "
                                              r"for it: torch, reference"):
        MoLoRAConfig(router="tempered", backend="sparse")
    with pytest.raises(AllocationError, match=r"router='nope' is not a known router; allowed: topk, soft, tempered"):
        MoLoRAConfig(router="nope")


def test_recipes_validate_routers_against_the_registry(tmp_path):
    from molora.run.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match=r"allocation.router.*router='nope' is not a known router; allowed: topk, "
                                          r"soft"):
        recipe_from_dict({"data": {"packaged": "bbc-news"}, "allocation": {"router": "nope"}})
    assert recipe_from_dict({"data": {"packaged": "bbc-news"}, "allocation": {"router": "soft"}}).allocation.router \
        == "soft"
