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
    with pytest.raises(ValueError, match=r"router='nope' is not a known router; allowed: topk, soft, topp, switch, expert_choice, hash, noisy_topk"):
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
    for name, gg, ww in zip("xabw", got_grads, want_grads, strict=True):
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
    with pytest.raises(AllocationError, match=r"router='nope' is not a known router; allowed: topk, soft, topp, switch, expert_choice, hash, noisy_topk, tempered"):
        MoLoRAConfig(router="nope")


def test_recipes_validate_routers_against_the_registry(tmp_path):
    from molora.run.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match=r"allocation.router.*router='nope' is not a known router; allowed: topk, "
                                          r"soft, topp, switch, expert_choice, hash"):
        recipe_from_dict({"data": {"packaged": "bbc-news"}, "allocation": {"router": "nope"}})
    assert recipe_from_dict({"data": {"packaged": "bbc-news"}, "allocation": {"router": "soft"}}).allocation.router \
        == "soft"


def _assert_loss_terms(model, ref, out_ref, batch_, coef, aux, reg):
    """``model`` (aux and regulariser on) returns task + coef * aux + reg as its loss, reports both terms, and its
    gradients equal autograd of that sum on ``ref`` (the same weights, both terms off; out_ref its output)."""
    from test_layer import causal_lm_loss

    ids, mask, labels = batch_
    params = {n: q for n, q in ref.named_parameters() if q.requires_grad}
    want = torch.autograd.grad(out_ref.loss + coef * aux + reg, list(params.values()))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out["aux_loss"], aux.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["router_regularizer"], reg.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels) + coef * aux.detach() + reg.detach(),
                               rtol=1e-5, atol=1e-6)
    out.loss.backward()
    got = dict(model.named_parameters())
    for (name, _), w_ in zip(params.items(), want, strict=True):
        torch.testing.assert_close(got[name].grad, w_, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ topp
def _naive_topp(x, a, b, w, k, top_p, scaling):
    """Per token: p = softmax(x W^T); experts by decreasing p until their mass reaches top_p (at most k);
    y = s * sum over them of p_e * B_e A_e x (not renormalised)."""
    num_experts = w.shape[0]
    r = a.shape[0] // num_experts
    out, chosen = [], []
    for t in range(x.shape[0]):
        p = torch.softmax(x[t] @ w.t(), -1)
        order = torch.argsort(p.detach(), descending=True).tolist()
        sel, mass = [], 0.0
        for e in order[:k]:
            if mass >= top_p:
                break
            sel.append(e)
            mass += float(p[e].detach())
        chosen.append(sel)
        out.append(scaling * sum(p[e] * (b[:, e * r:(e + 1) * r] @ (a[e * r:(e + 1) * r] @ x[t])) for e in sel))
    return torch.stack(out), chosen


def _topp_inputs(seed=0, T=24, d_in=12, d_out=10, E=5, r=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, requires_grad=True) for s in ((T, d_in), (E * r, d_in), (d_out, E * r),
                                                                       (E, d_in))]


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 1.0])
def test_topp_matches_the_per_token_reference_with_gradients(backend, top_p):
    x, a, b, w = _topp_inputs()
    k = 4
    g = torch.Generator().manual_seed(1)
    up, c = torch.randn(x.shape[0], b.shape[0], generator=g), torch.randn(w.shape[0], generator=g)
    out = moe_lora(x, a, b, w, top_k=k, scaling=0.5, router="topp", router_options={"top_p": top_p},
                   backend=backend)
    want, chosen = _naive_topp(x, a, b, w, k, top_p, 0.5)
    torch.testing.assert_close(out.delta, want, rtol=1e-5, atol=1e-5)
    sizes = [len(s) for s in chosen]
    if top_p in (0.6, 0.9):
        assert len(set(sizes)) > 1, sizes  # tokens really get different numbers of experts here
    counts = torch.zeros(w.shape[0])
    for s in chosen:
        counts[s] += 1
    torch.testing.assert_close(out.stats.counts, counts)  # statistics count each selection once
    want_prob_sum = torch.softmax(x @ w.t(), -1).sum(0)
    got = torch.autograd.grad((out.delta * up).sum() + (out.stats.prob_sum * c).sum(), (x, a, b, w))
    ref = torch.autograd.grad((want * up).sum() + (want_prob_sum * c).sum(), (x, a, b, w))
    for name, gg, rr in zip("xabw", got, ref, strict=True):
        torch.testing.assert_close(gg, rr, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topp_under_autocast_matches_the_reference_backend(dtype):
    x, a, b, w = _topp_inputs(seed=3)
    outs = []
    for backend in ("torch", "reference"):
        with torch.autocast("cpu", dtype=dtype):
            o = moe_lora(x, a, b, w, top_k=3, scaling=1.0, router="topp", router_options={"top_p": 0.7},
                         backend=backend)
        grads = torch.autograd.grad(o.delta.float().sum(), (x, a, b, w))
        outs.append((o.delta.float(), grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-2)
    for name, g1, g2 in zip("xabw", outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(g1.float(), g2.float(), rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.parametrize("options,match", [
    ({"top_p": 0.0}, r"top_p=0.0 must be a number in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be a number in \(0, 1\]"),
    ({"top_p": float("nan")}, r"top_p=nan must be a number in \(0, 1\]"),
    ({"entropy_coef": -1}, r"entropy_coef=-1 must be a number in \[0, 1e\+06\]"),
    ({"capacity": 2}, r"router 'topp' has no option 'capacity'; its options: top_p in \(0, 1\], entropy_coef"),
])
def test_topp_options_are_refused_naming_the_allowed_values(options, match):
    x, a, b, w = _topp_inputs()
    with pytest.raises(ValueError, match=match):
        moe_lora(x, a, b, w, top_k=2, scaling=1.0, router="topp", router_options=options)
    with pytest.raises(AllocationError, match=match):
        MoLoRAConfig(router="topp", router_options=options)
    with pytest.raises(ValueError, match=r"backend 'sparse' does not implement router 'topp'"):
        moe_lora(x, a, b, w, top_k=2, scaling=1.0, router="topp", backend="sparse")


def _topp_model(tiny_model, coef, ent):
    base = tiny_model("llama", num_layers=2)
    model = get_peft_model(base, MoLoRAConfig(num_experts=4, top_k=3, r=2, router="topp",
                                              router_options={"top_p": 0.6, "entropy_coef": ent},
                                              aux_loss_coef=coef, init_weights=False))
    model.train()
    return model


def test_topp_aux_loss_and_entropy_regulariser_match_their_formulas_with_gradients(tiny_model):
    from test_layer import batch, capture_inputs

    coef, ent = 0.3, 0.05
    model = _topp_model(tiny_model, coef, ent)
    ref = _topp_model(tiny_model, 0.0, 0.0)
    ref.load_state_dict(model.state_dict())
    ids, mask, labels = batch()
    calls, hooks = capture_inputs(ref)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    by_layer: dict = {}
    reg = torch.zeros(())
    for mod, x in calls:
        logits = x.reshape(-1, x.shape[-1]) @ mod.molora_router["default"].t()
        p = torch.softmax(logits.float(), -1)[keep]
        by_layer.setdefault(mod.layer_index, []).append(p)
        reg = reg + ent * (-(p * torch.log(p)).sum(-1)).mean()  # mean entropy over real tokens, per module
    aux = torch.zeros(())
    for layer, ps in by_layer.items():
        p = torch.cat(ps)
        vals, order = torch.sort(p.detach(), -1, descending=True)
        before = vals[:, :3].cumsum(-1) - vals[:, :3]
        sel = torch.zeros_like(p).scatter(1, torch.where(before < 0.6, order[:, :3], order[:, :1]), 1.0)
        f = sel.sum(0) / sel.sum()  # the fraction of all selections (a dynamic router's count varies per token)
        aux = aux + 4 * (f * p.mean(0)).sum()
    _assert_loss_terms(model, ref, out_ref, (ids, mask, labels), coef, aux, reg)


def test_topp_adapter_saves_loads_and_keeps_its_options(tiny_model, tmp_path):
    import json

    from peft import PeftModel

    model = _topp_model(tiny_model, 0.01, 0.001)
    model.eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["router"] == "topp" and cfg["router_options"] == {"top_p": 0.6, "entropy_coef": 0.001}
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_layers=2), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)


# ------------------------------------------------------------------------------------------ per-layer routers
def test_routers_per_layer_groups_and_lists(tiny_model):
    from molora import allocation_table

    model = get_peft_model(tiny_model("llama", num_layers=4), MoLoRAConfig(
        num_experts=4, top_k=2, r=2, router="topk,topp", router_options={"top_p": 0.6}, init_weights=False))
    by_layer = {}
    for m in model.modules():
        if hasattr(m, "router_type") and "default" in m.router_type:
            by_layer.setdefault(m.layer_index, set()).add((m.router_type["default"],
                                                           tuple(sorted(m.router_options["default"].items()))))
    assert by_layer[0] == by_layer[1] == {("topk", (("z_loss_coef", 0.0),))}  # topk's one option: the z-loss
    assert by_layer[2] == by_layer[3] == {("topp", (("entropy_coef", 0.0), ("top_p", 0.6)))}
    cfg = model.peft_config["default"]
    assert [row["router"] for row in cfg.allocation] == ["topk", "topk", "topp", "topp"]
    text = str(allocation_table(model))
    assert "router: topk; topp (top_p=0.6)" in text
    listed = get_peft_model(tiny_model("llama", num_layers=4), MoLoRAConfig(
        num_experts=4, top_k=2, r=2, router=["soft", "topk", "soft", "topp"]))
    assert [row["router"] for row in listed.peft_config["default"].allocation] == ["soft", "topk", "soft", "topp"]


@pytest.mark.parametrize("kw,match", [
    (dict(router=["topk", "nope", "topk", "topk"]), r"router='nope' is not a known router; allowed: topk, soft, topp, switch, expert_choice, hash, noisy_topk"),
    (dict(router=["topk", "topp"]), r"router=\['topk', 'topp'\] has 2 entries but the model has 4 layers"),
    (dict(router="topk,topp,soft,topk,topp"), r"has 5 groups but the model has 4 layers"),
    (dict(router="topk,soft", router_options={"top_p": 0.5}), r"router 'topk', 'soft' has no option 'top_p'; "
                                                                r"its options: z_loss_coef in \[0, 1e\+06\] \(topk\)"),
    (dict(router="soft,topp", backend="sparse"), r"backend='sparse' does not implement router='topp'"),
])
def test_per_layer_router_errors_name_the_value(tiny_model, kw, match):
    with pytest.raises(AllocationError, match=match):
        get_peft_model(tiny_model("llama", num_layers=4), MoLoRAConfig(num_experts=4, top_k=2, r=2, **kw))


def test_only_routers_with_a_load_loss_count_in_the_aux_loss(tiny_model):
    """soft layers have no load-balancing loss: with "soft,topk" the aux loss is the MoLA loss of layers 2-3 only,
    and the returned loss adds exactly that."""
    from test_layer import batch, capture_inputs, causal_lm_loss

    model = get_peft_model(tiny_model("llama", num_layers=4), MoLoRAConfig(
        num_experts=4, top_k=2, r=2, router="soft,topk", aux_loss_coef=0.5, init_weights=False))
    model.train()
    ids, mask, labels = batch()
    calls, hooks = capture_inputs(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    aux = torch.zeros(())
    for layer in (2, 3):
        p = torch.cat([torch.softmax((x.reshape(-1, x.shape[-1]) @ m.molora_router["default"].t()).float(), -1)[keep]
                       for m, x in calls if m.layer_index == layer])
        idx = torch.topk(p, 2, -1).indices
        f = torch.zeros_like(p).scatter(1, idx, 1.0).sum(0) / (2 * p.shape[0])
        aux = aux + 4 * (f * p.mean(0)).sum()
    torch.testing.assert_close(out["aux_loss"], aux.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels) + 0.5 * aux.detach(), rtol=1e-5,
                               atol=1e-6)
    summary = model.base_model.router_summary()
    assert [summary[i]["selects_top_k"] for i in range(4)] == [False, False, True, True]


def test_per_layer_routers_save_and_load(tiny_model, tmp_path):
    from conftest import assert_save_load_same_logits

    model = get_peft_model(tiny_model("llama", num_layers=4), MoLoRAConfig(
        num_experts=4, top_k=2, r=2, router="topk,topp", router_options={"top_p": 0.6}, init_weights=False))
    loaded = assert_save_load_same_logits(model, tiny_model("llama", num_layers=4), tmp_path / "a",
                                          torch.randint(0, 64, (2, 7)))
    assert loaded.peft_config["default"].router == "topk,topp"


# ------------------------------------------------------------------------------------------ switch
def _naive_switch(x, a, b, w, capacity_factor, scaling):
    """Per token in order: its argmax expert; the expert takes it while it has fewer than
    ceil(capacity_factor * T / E) tokens, else the token skips the adapter; y = s * p_e * B_e A_e x."""
    import math

    num_experts = w.shape[0]
    r = a.shape[0] // num_experts
    cap = math.ceil(capacity_factor * x.shape[0] / num_experts)
    taken = [0] * num_experts
    out, dropped = [], 0
    for t in range(x.shape[0]):
        p = torch.softmax(x[t] @ w.t(), -1)
        e = int(torch.argmax(p.detach()))
        taken[e] += 1
        if taken[e] > cap:
            dropped += 1
            out.append(torch.zeros(b.shape[0]) * p[e])
            continue
        out.append(scaling * p[e] * (b[:, e * r:(e + 1) * r] @ (a[e * r:(e + 1) * r] @ x[t])))
    return torch.stack(out), dropped


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0])
def test_switch_matches_the_per_token_reference_with_capacity_and_gradients(backend, capacity_factor):
    x, a, b, w = _topp_inputs(seed=2, T=30, E=4)
    g = torch.Generator().manual_seed(4)
    up, c = torch.randn(x.shape[0], b.shape[0], generator=g), torch.randn(w.shape[0], generator=g)
    out = moe_lora(x, a, b, w, top_k=1, scaling=0.5, router="switch", training=True,
                   router_options={"capacity_factor": capacity_factor}, backend=backend)
    want, dropped = _naive_switch(x, a, b, w, capacity_factor, 0.5)
    assert (dropped > 0) == (capacity_factor < 4.0), dropped  # the small factors really drop tokens
    torch.testing.assert_close(out.delta, want, rtol=1e-5, atol=1e-5)
    assert float(out.stats.dropped) == dropped  # the telemetry's count of tokens no expert computed
    # the load loss counts what the router asked for, dropped tokens included (as Switch's)
    want_counts = torch.bincount(torch.softmax(x @ w.t(), -1).argmax(-1), minlength=w.shape[0]).float()
    torch.testing.assert_close(out.stats.counts, want_counts)
    want_prob_sum = torch.softmax(x @ w.t(), -1).sum(0)
    got = torch.autograd.grad((out.delta * up).sum() + (out.stats.prob_sum * c).sum(), (x, a, b, w))
    ref = torch.autograd.grad((want * up).sum() + (want_prob_sum * c).sum(), (x, a, b, w))
    for name, gg, rr in zip("xabw", got, ref, strict=True):
        torch.testing.assert_close(gg, rr, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kw,match", [
    (dict(router_options={"capacity_factor": 0}), r"capacity_factor=0 must be a number in \(0, 1e\+06\]"),
    (dict(router_options={"capacity_factor": -1.0}), r"capacity_factor=-1.0 must be a number in \(0, 1e\+06\]"),
    (dict(router_options={"z_loss_coef": -0.1}), r"z_loss_coef=-0.1 must be a number in \[0, 1e\+06\]"),
    (dict(router_options={"top_p": 0.5}), r"router 'switch' has no option 'top_p'; its options: capacity_factor"),
    (dict(top_k=2), r"router 'switch' works with top_k=1 only; layer 0 has top_k=2"),
])
def test_switch_bad_options_are_refused_naming_the_allowed_values(tiny_model, kw, match):
    cfg = dict(num_experts=4, top_k=1, r=2, router="switch")
    cfg.update(kw)
    with pytest.raises(AllocationError, match=match):
        get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(**cfg))


def test_switch_load_loss_and_z_loss_match_their_formulas_with_gradients(tiny_model):
    from test_layer import batch, capture_inputs

    def build(coef, z):
        m = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
            num_experts=4, top_k=1, r=2, router="switch", aux_loss_coef=coef, init_weights=False,
            router_options={"capacity_factor": 1.0, "z_loss_coef": z}))
        m.train()
        return m

    coef, z = 0.3, 0.02
    model, ref = build(coef, z), build(0.0, 0.0)
    ref.load_state_dict(model.state_dict())
    ids, mask, labels = batch()
    calls, hooks = capture_inputs(ref)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    aux, zl, by_layer = torch.zeros(()), torch.zeros(()), {}
    for mod, x in calls:
        logits = (x.reshape(-1, x.shape[-1]) @ mod.molora_router["default"].t()).float()[keep]
        by_layer.setdefault(mod.layer_index, []).append(torch.softmax(logits, -1))
        zl = zl + z * (torch.logsumexp(logits, -1) ** 2).mean()
    for ps in by_layer.values():
        p = torch.cat(ps)
        f = torch.bincount(p.detach().argmax(-1), minlength=4).float() / p.shape[0]
        aux = aux + 4 * (f * p.mean(0)).sum()
    _assert_loss_terms(model, ref, out_ref, (ids, mask, labels), coef, aux, zl)


# ------------------------------------------------------------------------------------------ expert choice
def _naive_expert_choice(x, a, b, w, capacity_factor, scaling):
    """Per expert: the ceil(c * T / E) tokens with the largest probability for it; y_t = s * sum over the experts
    that chose t of p_te * B_e A_e x_t."""
    import math

    num_experts = w.shape[0]
    r = a.shape[0] // num_experts
    p = torch.softmax(x @ w.t(), -1)
    cap = min(x.shape[0], math.ceil(capacity_factor * x.shape[0] / num_experts))
    y = torch.zeros(x.shape[0], b.shape[0])
    per_token = [0] * x.shape[0]
    for e in range(num_experts):
        for t in torch.argsort(p[:, e].detach(), descending=True)[:cap].tolist():
            y = y.index_add(0, torch.tensor([t]), (scaling * p[t, e] * (b[:, e * r:(e + 1) * r]
                                                                         @ (a[e * r:(e + 1) * r] @ x[t])))[None])
            per_token[t] += 1
    return y, per_token


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_expert_choice_matches_the_per_expert_reference_with_gradients(backend, capacity_factor):
    x, a, b, w = _topp_inputs(seed=5, T=20, E=4)
    g = torch.Generator().manual_seed(6)
    up = torch.randn(x.shape[0], b.shape[0], generator=g)
    out = moe_lora(x, a, b, w, top_k=1, scaling=0.5, router="expert_choice", training=True,
                   router_options={"capacity_factor": capacity_factor}, backend=backend)
    want, per_token = _naive_expert_choice(x, a, b, w, capacity_factor, 0.5)
    assert len(set(per_token)) > 1, per_token  # tokens really get different numbers of experts
    torch.testing.assert_close(out.delta, want, rtol=1e-5, atol=1e-5)
    assert float(out.stats.dropped) == sum(n == 0 for n in per_token)  # tokens no expert chose
    got = torch.autograd.grad((out.delta * up).sum(), (x, a, b, w))
    ref = torch.autograd.grad((want * up).sum(), (x, a, b, w))
    for name, gg, rr in zip("xabw", got, ref, strict=True):
        torch.testing.assert_close(gg, rr, rtol=1e-4, atol=1e-5, msg=name)


def test_expert_choice_in_a_model_has_no_load_loss_and_reports_gate_mass(tiny_model):
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts=4, top_k=1, r=2, router="expert_choice", router_options={"capacity_factor": 1.0},
        init_weights=False))
    model.train()
    ids = torch.randint(0, 64, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "molora_router" in n)
    summary = model.base_model.router_summary()
    assert all(not s["selects_top_k"] for s in summary.values())
    with pytest.raises(AllocationError, match=r"capacity_factor=0 must be a number in \(0, 1e\+06\]"):
        MoLoRAConfig(router="expert_choice", router_options={"capacity_factor": 0})


# ------------------------------------------------------------------------------------------ hash
def test_hash_routes_by_token_id_against_the_per_token_reference():
    from molora_kernels.routing import hash_experts

    x, a, b, w = _topp_inputs(seed=8, T=20, E=4)
    ids = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(9))
    experts = hash_experts(ids, 4)
    assert len(set(experts.tolist())) == 4  # the hash spreads these ids over every expert
    r = a.shape[0] // 4
    want = torch.stack([0.5 * (b[:, e * r:(e + 1) * r] @ (a[e * r:(e + 1) * r] @ x[t]))
                        for t, e in enumerate(experts.tolist())])
    up = torch.randn(20, b.shape[0], generator=torch.Generator().manual_seed(1))
    ref = torch.autograd.grad((want * up).sum(), (x, a, b))
    for backend in ("torch", "reference"):
        out = moe_lora(x, a, b, w, top_k=1, scaling=0.5, router="hash", token_ids=ids, backend=backend)
        torch.testing.assert_close(out.delta, want, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad((out.delta * up).sum(), (x, a, b, w))
        for name, gg, rr in zip("xab", got[:3], ref, strict=True):
            torch.testing.assert_close(gg, rr, rtol=1e-4, atol=1e-5, msg=f"{backend} {name}")
        assert float(got[3].abs().max()) == 0.0  # the router weights do not take part in the routing
    with pytest.raises(ValueError, match="router 'hash' routes by token id, but no token ids reached this layer"):
        moe_lora(x, a, b, w, top_k=1, scaling=0.5, router="hash")


def test_hash_in_a_model_trains_generates_and_refuses_inputs_embeds(tiny_model):
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=4, top_k=1, r=2,
                                                                           router="hash", init_weights=False))
    model.train()
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "molora_B" in n)
    model.eval()
    assert model.generate(input_ids=ids[:1, :3], max_new_tokens=3, do_sample=False).shape == (1, 6)  # KV cache
    with pytest.raises(ValueError, match=r"router 'hash' routes by token id, but the model's input_ids do not "
                                         r"line up with this layer's input"):
        model(inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(AllocationError, match=r"router 'hash' works with top_k=1 only; layer 0 has top_k=2"):
        get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=4, top_k=2, router="hash"))


@pytest.mark.parametrize("router,k,opts", [("switch", 1, {"capacity_factor": 1.0}),
                                           ("expert_choice", 1, {"capacity_factor": 1.5}), ("hash", 1, None)])
def test_new_routers_save_and_load(tiny_model, tmp_path, router, k, opts):
    from conftest import assert_save_load_same_logits

    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts=4, top_k=k, r=2, router=router, router_options=opts, init_weights=False))
    ids = torch.randint(0, 64, (2, 7))
    loaded = assert_save_load_same_logits(model, tiny_model("llama", num_layers=2), tmp_path / "a", ids)
    assert loaded.peft_config["default"].router == router


# ------------------------------------------------------------------------------------------ dropped tokens
@pytest.mark.parametrize("router,k,opts", [("topk", 2, None), ("soft", 2, None), ("topp", 3, {"top_p": 0.5}),
                                           ("switch", 1, {"capacity_factor": 0.5}),
                                           ("expert_choice", 1, {"capacity_factor": 0.5})])
def test_dropped_tokens_are_counted_over_the_real_tokens_only(router, k, opts):
    """stats.dropped = real tokens whose gates are all 0 (no expert computed them): 0 for routers that route every
    token; for capacity routers the direct count from the gates, padding (token_mask 0) left out."""
    x, a, b, w = _topp_inputs(seed=9, T=24, E=4)
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[::5] = False
    out = moe_lora(x, a, b, w, top_k=k, scaling=0.5, router=router, router_options=opts, token_mask=mask,
                   backend="torch", training=True)
    none = (out.routing.gates == 0).all(-1)
    assert float(out.stats.dropped) == float((none & mask).sum())
    if router in ("switch", "expert_choice"):
        assert 0 < float(out.stats.dropped) < float(none.sum())  # some real and some padding positions dropped
    else:
        assert float(out.stats.dropped) == 0


def test_dropped_tokens_reach_the_summary_telemetry_and_diagnostics(tiny_model):
    """A Switch model with a small capacity: router_summary's dropped fraction is the modules' count over their
    tokens, the interval telemetry averages it, and the diagnostics name the layer and the remedy."""
    from molora.run.diagnostics import diagnose, diagnosis_text
    from molora.run.telemetry import RouterTelemetry, flat_router_scalars, router_headline

    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts=4, top_k=1, r=2, router="switch", router_options={"capacity_factor": 0.5}, init_weights=False,
        task_type="CAUSAL_LM"))
    model.train()
    tele = RouterTelemetry(model)
    ids = torch.randint(0, 64, (2, 12))
    fractions = []
    for _ in range(2):
        model(input_ids=ids, labels=ids)
        record = model.base_model.collector.current
        summary = model.base_model.router_summary()
        for layer, entry in record.layers.items():
            want = sum(float(st.dropped) for st in entry.stats) / sum(float(st.n_tokens) for st in entry.stats)
            assert summary[layer]["dropped"] == pytest.approx(want)
        fractions.append([summary[layer]["dropped"] for layer in sorted(summary)])
    router = tele.collect()
    tele.close()
    assert router["dropped"] == pytest.approx([sum(f) / 2 for f in zip(*fractions, strict=True)], abs=1e-6)
    assert min(router["dropped"]) > 0.25  # capacity 0.5 x T / E: at least half the tokens over capacity
    assert "router/L00/dropped" in flat_router_scalars(router)
    assert router_headline(router)["router_max_dropped"] == pytest.approx(max(router["dropped"]), abs=1e-4)
    run = {"train": [{"step": s, "router": router} for s in (1, 2, 3)], "eval": [], "accuracy": {}, "runs": [],
           "summary": None}
    diags = diagnose(run)
    assert [d.dropped for d in diags] == pytest.approx(router["dropped"], abs=1e-4)
    text = diagnosis_text(diags)
    assert "got no expert (over capacity): raise router_options.capacity_factor" in text
    assert "capacity: 2 layer(s) leave more than 1% of their tokens to no expert" in text


def test_no_dropped_tokens_no_capacity_lines(tiny_model):
    from molora.run.telemetry import RouterTelemetry, flat_router_scalars, router_headline

    # no task_type: PeftModel calls the wrapped model directly, and the telemetry still sees each forward once
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=4, top_k=2, r=2,
                                                                            init_weights=False))
    model.train()
    tele = RouterTelemetry(model)
    model(input_ids=torch.randint(0, 64, (2, 12)))
    router = tele.collect()
    tele.close()
    assert router["forwards"] == 1 and router["tokens"] == [24.0, 24.0]
    assert router["dropped"] == [0.0, 0.0]
    assert not any(k.endswith("/dropped") for k in flat_router_scalars(router))
    assert "router_max_dropped" not in router_headline(router)


def test_headline_entropy_leaves_out_layers_without_a_choice(tiny_model):
    """A layer with one expert (or E = top_k) routes every token to every expert: its entropy_norm reads 1.0
    (uniform) and would inflate the logged mean; the headline averages the routed layers only."""
    from molora.run.telemetry import RouterTelemetry, router_headline

    model = get_peft_model(tiny_model("llama", num_layers=3), MoLoRAConfig(num_experts=[1, 2, 4], top_k=[1, 2, 1],
                                                                            r=2, init_weights=False))
    model.train()
    tele = RouterTelemetry(model)
    model(input_ids=torch.randint(0, 64, (2, 12)))
    router = tele.collect()
    tele.close()
    assert router["num_experts"] == [1, 2, 4] and router["entropy_norm"][0] == pytest.approx(1.0)
    assert router_headline(router)["router_entropy_norm"] == pytest.approx(router["entropy_norm"][2], abs=1e-4)
    lora = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=1, top_k=1, r=2))
    tele = RouterTelemetry(lora)
    lora(input_ids=torch.randint(0, 64, (2, 12)))
    router = tele.collect()
    tele.close()
    assert "router_entropy_norm" not in router_headline(router), "plain LoRA has no routing to report"


# ------------------------------------------------------------------------------------------ batch invariance
CAPACITY_ROUTERS = [("switch", {"capacity_factor": 0.5}), ("expert_choice", {"capacity_factor": 0.75})]


@pytest.mark.parametrize("router,opts", CAPACITY_ROUTERS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_padding_takes_no_capacity_in_training(router, opts, backend):
    """Issue 19.1: in training, the real tokens of a micro-batch route (and get gradients) exactly as if the padding
    were not there, wherever the padding sits; without the mask the padding does take capacity."""
    x, a, b, w = _topp_inputs(seed=11, T=24, E=4)
    mask = torch.ones(24, dtype=torch.bool)
    mask[:4] = False          # left padding of one row
    mask[14:17] = False       # right padding of another
    up = torch.randn(24, b.shape[0], generator=torch.Generator().manual_seed(3))
    kw = dict(top_k=1, scaling=0.5, router=router, router_options=opts, backend=backend, training=True)
    padded = moe_lora(x, a, b, w, routing_mask=mask, **kw)
    xr = x.detach()[mask].requires_grad_(True)
    alone = moe_lora(xr, a, b, w, **kw)
    torch.testing.assert_close(padded.delta[mask], alone.delta, rtol=1e-5, atol=1e-6)
    assert float((padded.routing.gates[~mask] != 0).sum()) == 0          # padding goes to no expert
    assert float((alone.routing.gates == 0).all(-1).sum()) > 0          # the capacity really drops real tokens
    got = torch.autograd.grad((padded.delta * up).sum(), (x, a, b, w))
    want = torch.autograd.grad((alone.delta * up[mask]).sum(), (xr, a, b, w))
    torch.testing.assert_close(got[0][mask], want[0], rtol=1e-4, atol=1e-6)
    for name, g, r in zip("abw", got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)
    unmasked = moe_lora(x.detach(), a, b, w, **kw)
    assert not torch.allclose(unmasked.delta[mask], alone.delta, atol=1e-6), "padding took capacity before"


@pytest.mark.parametrize("router,opts", CAPACITY_ROUTERS)
def test_capacity_routers_route_each_token_alone_at_inference(router, opts):
    """At inference (training=False) a capacity router's output for a token does not depend on the others:
    Switch is dropless (top-1 weighted by its probability), expert choice gives each token its round(capacity_factor)
    most probable experts weighted by their probabilities."""
    from molora_kernels.routing import expert_choice_eval_k

    x, a, b, w = _topp_inputs(seed=12, T=10, E=4)
    kw = dict(top_k=1, scaling=0.5, router=router, router_options=opts, backend="torch")
    batched = moe_lora(x, a, b, w, **kw).delta
    single = torch.cat([moe_lora(x[t:t + 1], a, b, w, **kw).delta for t in range(10)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    k = 1 if router == "switch" else expert_choice_eval_k(opts["capacity_factor"], 4)
    assert expert_choice_eval_k(0.5, 4) == 1 and expert_choice_eval_k(1.5, 4) == 2 and expert_choice_eval_k(9, 4) == 4
    r = a.shape[0] // 4
    p = torch.softmax(x @ w.t(), -1)
    want = torch.stack([sum(0.5 * p[t, e] * (b[:, e * r:(e + 1) * r] @ (a[e * r:(e + 1) * r] @ x[t]))
                            for e in torch.topk(p[t], k).indices.tolist()) for t in range(10)])
    torch.testing.assert_close(batched, want, rtol=1e-5, atol=1e-6)


def _prompt_logits(model, ids, placement):
    """Logits of ``ids`` [n] at its own positions: alone, beside another prompt, right- or left-padded in a batch
    (position ids taken from the attention mask, as generation does)."""
    n = ids.shape[0]
    other = torch.randint(3, 64, (n + 3,), generator=torch.Generator().manual_seed(5))
    if placement == "alone":
        batch_ids, mask, row, sl = ids[None], torch.ones(1, n, dtype=torch.long), 0, slice(0, n)
    elif placement == "batch":  # twice, and beside another prompt
        batch_ids = torch.stack([other, torch.cat([ids, other[:3]]), torch.cat([ids, other[:3]])])
        mask = torch.ones_like(batch_ids)
        row, sl = 1, slice(0, n)
    elif placement == "right":
        batch_ids = torch.stack([other, torch.cat([ids, torch.zeros(3, dtype=torch.long)])])
        mask = torch.ones_like(batch_ids)
        mask[1, n:] = 0
        row, sl = 1, slice(0, n)
    else:  # left
        batch_ids = torch.stack([other, torch.cat([torch.zeros(3, dtype=torch.long), ids])])
        mask = torch.ones_like(batch_ids)
        mask[1, :3] = 0
        row, sl = 1, slice(3, n + 3)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=batch_ids, attention_mask=mask, position_ids=pos).logits
    return logits[row, sl]


ALL_ROUTERS = [("topk", 2, None), ("soft", 2, None), ("topp", 3, {"top_p": 0.6}),
               ("switch", 1, {"capacity_factor": 0.5}), ("expert_choice", 1, {"capacity_factor": 0.75}),
               ("hash", 1, None), ("noisy_topk", 2, {"noise_std": 3.0, "expert_dropout": 0.5})]


@pytest.mark.parametrize("router,k,opts", ALL_ROUTERS, ids=[r[0] for r in ALL_ROUTERS])
def test_inference_logits_do_not_depend_on_the_batch_or_padding(tiny_model, router, k, opts):
    """Issue 19.1: in eval mode every router gives a prompt the same logits alone, in a batch (twice, beside
    another prompt), right-padded and left-padded; so `molora eval` does not depend on batch size or order."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts=4, top_k=k, r=2, router=router, router_options=opts, init_weights=False))
    model.eval()
    ids = torch.randint(3, 64, (9,), generator=torch.Generator().manual_seed(2))
    want = _prompt_logits(model, ids, "alone")
    for placement in ("batch", "right", "left"):
        torch.testing.assert_close(_prompt_logits(model, ids, placement), want, rtol=1e-4, atol=5e-5,
                                   msg=lambda m: f"{router}, {placement}: {m}")


@pytest.mark.parametrize("router,opts", CAPACITY_ROUTERS)
def test_capacity_routers_in_a_model_give_padding_no_place_in_training(tiny_model, router, opts):
    """In train mode the same prompt right- or left-padded (one row) routes as it does alone: the attention mask
    reaches the routing, so padding takes no capacity (the loss over the real tokens is the same)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts=4, top_k=1, r=2, router=router, router_options=opts, init_weights=False))
    model.train()
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(4))
    pad = torch.zeros(1, 4, dtype=torch.long)
    alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    for side in ("right", "left"):
        batch_ids = torch.cat([ids, pad], 1) if side == "right" else torch.cat([pad, ids], 1)
        mask = (torch.arange(14) < 10) if side == "right" else (torch.arange(14) >= 4)
        mask = mask.long()[None]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        got = model(input_ids=batch_ids, attention_mask=mask, position_ids=pos).logits[0][mask[0].bool()]
        torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5, msg=lambda m: f"{side}: {m}")

