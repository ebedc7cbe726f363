"""Levers that help routers specialise (issue 18): router z-loss for topk/soft, router init, orthogonal expert init,
an always-on shared expert, the router learning-rate multiplier, and the expert-update cosine that measures whether
experts differ. Each against a direct computation."""
from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

import molora
from molora import MoLoRAConfig
from molora.allocation import AllocationError

from conftest import assert_save_load_same_logits, forward_capturing_inputs
from test_layer import batch, capture_inputs, causal_lm_loss
from test_routers import _assert_loss_terms


def _modules(model):
    return [m for m in model.modules() if isinstance(m, molora.tuner.layer.MoLoRALayer) and "default" in m.molora_A]


# ------------------------------------------------------------------------------------------ z-loss on topk / soft
@pytest.mark.parametrize("router,backend", [("topk", "torch"), ("topk", "reference"), ("soft", "torch")])
def test_z_loss_on_topk_and_soft_matches_its_formula_with_gradients(tiny_model, router, backend):
    z = 0.05

    def build(zc):
        m = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
            num_experts=4, top_k=2, r=2, router=router, backend=backend, aux_loss_coef=0.0, init_weights=False,
            router_options={"z_loss_coef": zc}))
        m.train()
        return m

    model, ref = build(z), build(0.0)
    ref.load_state_dict(model.state_dict())
    ids, mask, labels = batch()
    out_ref, calls = forward_capturing_inputs(ref, ids, mask, labels)
    keep = mask.reshape(-1).bool()
    zl = torch.zeros(())
    for mod, x in calls:
        logits = (x.reshape(-1, x.shape[-1]) @ mod.molora_router["default"].t()).float()[keep]
        zl = zl + z * (torch.logsumexp(logits, -1) ** 2).mean()
    aux = out_ref["aux_loss"]  # reported (coefficient 0: not added); the z-loss does not change it
    _assert_loss_terms(model, ref, out_ref, (ids, mask, labels), 0.0, torch.zeros(()) if aux is None else aux, zl)


def test_z_loss_reaches_no_backend_as_a_routing_option():
    """The z-loss weight is the tuner's; the op (every backend) gets only options that change the routing."""
    from molora_kernels import get_router

    assert get_router("topk").routing_options({"z_loss_coef": 0.1}) == {}
    assert get_router("topp").routing_options({"top_p": 0.5, "entropy_coef": 0.1}) == {"top_p": 0.5}


# ------------------------------------------------------------------------------------------ inits
def test_router_init_zeros_starts_uniform_and_kaiming_does_not(tiny_model):
    zeros = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=4, top_k=2, r=2,
                                                                           router_init="zeros"))
    for m in _modules(zeros):
        assert torch.count_nonzero(m.molora_router["default"]) == 0
    kaiming = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=4, top_k=2, r=2))
    for m in _modules(kaiming):
        w = m.molora_router["default"]
        assert torch.count_nonzero(w) == w.numel()
        assert w.abs().max() <= 1 / math.sqrt(w.shape[1]) + 1e-6  # kaiming_uniform(a=sqrt(5)) bound


def test_orthogonal_expert_init_gives_orthogonal_rows_of_kaiming_norm(tiny_model):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", num_layers=2, hidden_size=64), MoLoRAConfig(
        num_experts=4, top_k=2, r=4, expert_init="orthogonal", target_modules=["q_proj", "o_proj"]))
    for m in _modules(model):
        a = m.molora_A["default"].detach().double()  # [16, 64]
        gram = a @ a.T
        torch.testing.assert_close(gram, torch.eye(a.shape[0], dtype=torch.float64) / 3, atol=1e-6, rtol=0)
        assert torch.count_nonzero(m.molora_B["default"]) == 0  # still starts as the base model


def _svd_directions(w: torch.Tensor) -> torch.Tensor:
    """The right singular vectors of ``w`` [d_out, d_in], by falling singular value, in float64."""
    return torch.linalg.svd(w.detach().double(), full_matrices=False)[2]


@pytest.mark.parametrize("arch,targets,num_experts,r", [
    ("llama", ["q_proj", "down_proj"], 4, 4),     # E·r = 16 < rank: only singular directions
    ("llama", ["k_proj"], 4, 12),                 # k_proj W is [32, 64]: 48 rows > its rank 32
    ("gpt2", ["c_attn", "c_proj"], 3, 4),         # Conv1D stores W as [d_in, d_out]
])
def test_svd_expert_init_deals_the_top_singular_directions_round_robin(tiny_model, arch, targets, num_experts, r):
    """Expert e's row j = ±(j·E + e)-th right singular vector of the base weight, norm sqrt(1/3); past the weight's
    rank, random directions orthogonal to those and each other; B = 0."""
    torch.manual_seed(0)
    base = tiny_model(arch, num_layers=2, hidden_size=64)
    model = get_peft_model(base, MoLoRAConfig(num_experts=num_experts, top_k=2, r=r, expert_init="svd",
                                              target_modules=targets))
    mods = _modules(model)
    assert mods
    for m in mods:
        w = m.get_base_layer().weight
        w = w.t() if m.fan_in_fan_out else w                      # [d_out, d_in]
        vh = _svd_directions(w)
        a = m.molora_A["default"].detach().double()               # [E·r, d_in]
        assert a.shape == (num_experts * r, w.shape[1])
        n = min(a.shape[0], vh.shape[0])
        for e in range(num_experts):
            for j in range(r):
                k = j * num_experts + e
                if k < n:
                    assert abs(float(a[e * r + j] @ vh[k])) == pytest.approx(math.sqrt(1 / 3), abs=1e-5), (m, e, j)
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64) / 3, atol=1e-5, rtol=0)
        assert torch.count_nonzero(m.molora_B["default"]) == 0


def test_svd_expert_init_with_more_rows_than_inputs_keeps_the_norm_and_the_principal_rows(tiny_model):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", num_layers=1, hidden_size=32), MoLoRAConfig(
        num_experts=5, top_k=2, r=8, expert_init="svd", target_modules=["q_proj"]))   # 40 rows > d_in 32
    (m,) = _modules(model)
    a = m.molora_A["default"].detach().double()
    torch.testing.assert_close(a.norm(dim=1), torch.full((40,), math.sqrt(1 / 3), dtype=torch.float64), atol=1e-6,
                               rtol=0)
    vh = _svd_directions(m.get_base_layer().weight)
    rows = [e * 8 + j for j in range(8) for e in range(5) if j * 5 + e < 32]   # the rows that got a direction
    got = torch.stack([a[i] for i in rows])
    want = torch.stack([vh[(i % 8) * 5 + i // 8] for i in rows])
    torch.testing.assert_close((got * want).sum(1).abs(), torch.full((len(rows),), math.sqrt(1 / 3),
                                                                         dtype=torch.float64), atol=1e-5, rtol=0)


def test_svd_expert_init_reads_a_bf16_base_in_fp32_and_starts_as_the_base_model(tiny_model):
    torch.manual_seed(0)
    base = tiny_model("llama", num_layers=2, hidden_size=64).to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = get_peft_model(base, MoLoRAConfig(num_experts=4, top_k=2, r=4, expert_init="svd"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want)   # B = 0: exactly the base model
    m = _modules(model)[0]
    vh = _svd_directions(m.get_base_layer().weight.float())
    a = m.molora_A["default"].detach().double()
    assert abs(float(a[0] @ vh[0])) == pytest.approx(math.sqrt(1 / 3), abs=1e-2)   # bf16 A: 3 digits


def test_svd_expert_init_refuses_a_weight_it_cannot_read_naming_the_module(tiny_model):
    """Under ZeRO-3 a parameter is an empty 1-d shard until gathered: the init must not factor it."""
    base = tiny_model("llama", num_layers=1)
    q = base.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    with pytest.raises(ValueError, match=r"expert_init='svd' reads the base weight of model\.layers\.0\.self_attn"
                                         r"\.q_proj.*ZeRO-3.*expert_init='orthogonal'"):
        get_peft_model(base, MoLoRAConfig(num_experts=4, top_k=2, r=2, expert_init="svd", target_modules=["q_proj"]))


def test_svd_expert_init_trains_saves_and_loads(tiny_model, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=4, top_k=2, r=2,
                                                                           expert_init="svd"))
    ids, mask, labels = batch()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert any(torch.count_nonzero(m.molora_B["default"]) for m in _modules(model))
    assert_save_load_same_logits(model, tiny_model("llama", num_layers=2), tmp_path / "a", ids)


def _rows_ones(a, **_):
    a.fill_(0.25)


def test_every_registered_expert_init_starts_as_the_base_model_and_a_new_one_registers(tiny_model):
    from molora.allocation.expert_inits import (EXPERT_INIT_REGISTRY, ExpertInit, expert_init_names,
                                                register_expert_init)

    ids = torch.randint(0, 64, (2, 7))
    register_expert_init(ExpertInit("test_const", f"{__name__}:_rows_ones", "every entry 1/4 (test)"))
    try:
        assert "test_const" in expert_init_names()
        for name in expert_init_names():
            base = tiny_model("llama", num_layers=2)
            with torch.no_grad():
                want = base(input_ids=ids).logits
            model = get_peft_model(base, MoLoRAConfig(num_experts=4, top_k=2, r=2, expert_init=name))
            with torch.no_grad():
                torch.testing.assert_close(model(input_ids=ids).logits, want, msg=name)
            if name == "test_const":
                assert all(bool((m.molora_A["default"] == 0.25).all()) for m in _modules(model))
        with pytest.raises(ValueError, match="already registered"):
            register_expert_init(ExpertInit("svd", "svd", "twice"))
    finally:
        EXPERT_INIT_REGISTRY.pop("test_const", None)
    with pytest.raises(AllocationError, match="expert_init='test_const'; allowed: kaiming, orthogonal, svd"):
        MoLoRAConfig(num_experts=4, top_k=2, r=2, expert_init="test_const")


@pytest.mark.parametrize("kw,match", [
    (dict(router_init="normal"), r"router_init='normal'; allowed: kaiming, zeros"),
    (dict(expert_init="pissa"), r"expert_init='pissa'; allowed: kaiming, orthogonal, svd"),
    (dict(shared_expert_r=-1), r"shared_expert_r=-1 must be an int >= 0"),
    (dict(router_options={"z_loss_coef": -1}), r"z_loss_coef=-1 must be a number in \[0, 1e\+06\]"),
])
def test_bad_lever_values_are_refused_naming_the_allowed_ones(kw, match):
    with pytest.raises(AllocationError, match=match):
        MoLoRAConfig(num_experts=4, top_k=2, r=2, **kw)


# ------------------------------------------------------------------------------------------ shared expert
def test_shared_expert_adds_a_lora_on_every_token_with_gradients(tiny_model):
    """y = base + routed mixture + (alpha / s) B_s A_s x on every token; the routed part is the model without it."""
    cfg = dict(num_experts=4, top_k=2, r=2, lora_alpha=8, init_weights=False, lora_dropout=0.0, aux_loss_coef=0.0)
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(shared_expert_r=3, **cfg))
    plain = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(**cfg))
    plain.load_state_dict(model.state_dict(), strict=False)
    ids, mask, labels = batch()
    calls, hooks = capture_inputs(model)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    for h in hooks:
        h.remove()
    # each module's output = the routed module's output + the shared LoRA on its input
    mods = _modules(model)
    plain_mods = {m.module_name: m for m in _modules(plain)}
    plain.train()
    for mod, x in calls[: len(mods)]:
        sa, sb = mod.molora_shared_A["default"], mod.molora_shared_B["default"]
        assert sa.shape == (3, mod.in_features) and sb.shape == (mod.out_features, 3)
        want = plain_mods[mod.module_name](x) + (x @ sa.T @ sb.T) * (8 / 3)
        torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    g = mods[0].molora_shared_B["default"].grad
    assert g is not None and torch.count_nonzero(g) > 0
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels))


def test_shared_expert_saves_loads_and_merges_where_static(tiny_model, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts="1,4", top_k=1, r=2, shared_expert_r=2, init_weights=False))
    assert_save_load_same_logits(model, tiny_model("llama", num_layers=2), tmp_path / "a", torch.randint(0, 64, (2, 6)))
    # a single-expert layer with a shared expert is static: delta_weight folds both
    single = [m for m in _modules(model) if m.num_experts["default"] == 1][0]
    x = torch.randn(5, single.in_features)
    with torch.no_grad():
        dw = single.delta_weight("default")
        torch.testing.assert_close(single(x), single.get_base_layer()(x) + x @ dw.T, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ router lr multiplier
def test_router_lr_multiplier_puts_routers_in_their_own_group(tiny_model):
    from molora.run.trainer import split_router_groups

    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(num_experts=4, top_k=2, r=2))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0, "lr": 1e-3}], lr=1e-3)
    moved = split_router_groups(opt, model, 10.0)
    routers = {id(p) for n, p in model.named_parameters() if "molora_router" in n}
    assert moved == len(routers) > 0
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_lr[1e-2] == routers and not (by_lr[1e-3] & routers)
    assert split_router_groups(opt, model, 1.0) == 0
    # one AdamW step from zero moments moves every weight by ~lr: the routers by 10x as much
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in before:
            step = (before[n] - p.detach()).abs().max().item()
            assert step == pytest.approx(1e-2 if "molora_router" in n else 1e-3, rel=1e-3), n


# ------------------------------------------------------------------------------------------ expert diversity
def test_expert_update_cosines_equal_the_dense_computation():
    from molora.run.expert_diversity import expert_update_cosines

    g = torch.Generator().manual_seed(3)
    e, r, d_in, d_out = 3, 2, 7, 5
    a, b = torch.randn(e * r, d_in, generator=g), torch.randn(d_out, e * r, generator=g)
    b[:, 4:] = b[:, :2] * 2.0   # expert 2 = 2 x expert 0 in B ...
    a[4:] = a[:2]               # ... and the same A: the same direction
    got = expert_update_cosines(a, b, e)
    a, b = a.double(), b.double()
    dw = [(b[:, i * r:(i + 1) * r] @ a[i * r:(i + 1) * r]).reshape(-1) for i in range(e)]
    want = torch.tensor([[float(x @ y / (x.norm() * y.norm())) for y in dw] for x in dw], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert got[0, 2] == pytest.approx(1.0)
    # shared_a: one A for every head
    sa = torch.randn(r, d_in, generator=g).double()
    got = expert_update_cosines(sa, b, e)
    dw = [(b[:, i * r:(i + 1) * r] @ sa).reshape(-1) for i in range(e)]
    want = torch.tensor([[float(x @ y / (x.norm() * y.norm())) for y in dw] for x in dw], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert expert_update_cosines(a, torch.zeros(d_out, e * r), e) is None  # untrained (B = 0): undefined


def test_adapter_expert_similarity_reads_a_saved_adapter(tiny_model, tmp_path):
    from molora.run.expert_diversity import adapter_expert_similarity, expert_update_cosines

    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        num_experts="1,3", top_k=1, r=2, init_weights=False, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "a")
    sim = adapter_expert_similarity(tmp_path / "a")
    assert set(sim) == {1}  # layer 0 has one expert: nothing to compare
    want = []
    for m in _modules(model):
        if m.layer_index == 1:
            c = expert_update_cosines(m.molora_A["default"], m.molora_B["default"], 3)
            want.append(float(c[~torch.eye(3, dtype=torch.bool)].mean()))
    assert sim[1] == pytest.approx(sum(want) / len(want), rel=1e-6)


def test_shared_expert_under_bf16_autocast_matches_fp32_with_gradients(tiny_model):
    cfg = MoLoRAConfig(num_experts=4, top_k=2, r=2, shared_expert_r=3, init_weights=False, lora_dropout=0.0,
                       aux_loss_coef=0.0)
    model = get_peft_model(tiny_model("llama", num_layers=2), cfg)
    mod = _modules(model)[0]
    x = torch.randn(5, mod.in_features, requires_grad=True)
    want = mod(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mod(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    got.float().sum().backward()
    assert mod.molora_shared_B["default"].grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------ noisy top-k, expert dropout
def _noisy_by_hand(logits, k, std, p, seed):
    """The noisy_topk routing of the module doc, drawn from the same seed in the same order."""
    torch.manual_seed(seed)
    z = logits.float() + std * torch.randn_like(logits.float()) if std else logits.float()
    if p:
        u = torch.rand_like(z)
        kth = torch.sort(u, dim=-1, descending=True).values[:, k - 1:k]
        z = torch.where((u < p) & (u < kth), torch.full_like(z, -math.inf), z)
    probs = torch.softmax(z, -1)
    vals, idx = torch.topk(probs, k, -1)
    return torch.zeros_like(probs).scatter(-1, idx, vals / vals.sum(-1, keepdim=True)), probs


@pytest.mark.parametrize("std,p", [(0.7, 0.0), (0.0, 0.5), (1.0, 0.9)])
def test_noisy_topk_routes_like_its_formula_and_like_topk_at_inference(std, p):
    from molora_kernels import get_router

    logits = torch.randn(400, 6, generator=torch.Generator().manual_seed(3))
    r, opts = get_router("noisy_topk"), {"noise_std": std, "expert_dropout": p}
    torch.manual_seed(11)
    got = r.route(logits, 2, opts, training=True)
    want_gates, want_probs = _noisy_by_hand(logits, 2, std, p, 11)
    torch.testing.assert_close(got.gates, want_gates)
    torch.testing.assert_close(got.probs, want_probs)
    assert not torch.equal(got.gates, r.route(logits, 2, opts, training=True).gates), "a fresh draw per call"
    if p:
        hidden = got.probs == 0
        assert (hidden.sum(-1) <= 6 - 2).all(), "every token keeps top_k experts"
        assert 0.6 * p * 4 / 6 < hidden.float().mean() <= p, "about expert_dropout of the droppable ones"
        assert not got.gates[hidden].any(), "a hidden expert is never chosen"
    # inference, and training with both off, are exactly MoLA's top-k
    plain = get_router("topk").route(logits, 2)
    assert torch.equal(r.route(logits, 2, opts, training=False).gates, plain.gates)
    assert torch.equal(r.route(logits, 2, {"noise_std": 0.0}, training=True).gates, plain.gates)


@pytest.mark.parametrize("autocast", [False, True])
def test_noisy_topk_hand_written_backward_equals_autograd_on_the_same_draw(autocast):
    from molora_kernels import moe_lora

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 10, generator=g).requires_grad_()
    a = (torch.randn(5 * 3, 10, generator=g) / 3).requires_grad_()
    b = torch.randn(9, 5 * 3, generator=g).requires_grad_()
    w = torch.randn(5, 10, generator=g).requires_grad_()
    dy, c = torch.randn(24, 9, generator=g), torch.randn(5, generator=g)
    opts = {"noise_std": 1.0, "expert_dropout": 0.4}
    res = {}
    for backend in ("torch", "reference"):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = moe_lora(x, a, b, w, top_k=2, scaling=0.5, router="noisy_topk", router_options=opts,
                           backend=backend, training=True)
        loss = (out.delta.float() * dy).sum() + (out.stats.prob_sum * c).sum()
        res[backend] = (out.delta.detach().float(), out.routing.probs, torch.autograd.grad(loss, (x, a, b, w)))
    tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    assert (res["torch"][1] == 0).any(), "some experts were hidden"
    torch.testing.assert_close(res["torch"][1], res["reference"][1])
    torch.testing.assert_close(res["torch"][0], res["reference"][0], **tol)
    for n, got, ref in zip("xabw", res["torch"][2], res["reference"][2], strict=True):
        torch.testing.assert_close(got.float(), ref.float(), **tol, msg=f"d{n}")


def test_noisy_topk_in_a_model_trains_with_noise_and_evaluates_as_topk(tiny_model, tmp_path):
    """In train mode the forward is random (two calls differ) and every gradient is finite; in eval mode the model
    equals the same weights routed by plain topk, before and after a save/load."""
    torch.manual_seed(0)
    cfg = dict(num_experts=4, top_k=2, r=2, init_weights=False, lora_dropout=0.0)
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(
        router="noisy_topk", router_options={"noise_std": 2.0, "expert_dropout": 0.3}, **cfg))
    plain = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(**cfg))
    plain.load_state_dict(model.state_dict())
    ids, mask, labels = batch()
    model.train()
    one = model(input_ids=ids, attention_mask=mask, labels=labels)
    two = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert not torch.equal(one.logits, two.logits), "training routes with fresh noise"
    one.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "molora_router" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(torch.count_nonzero(g) for g in grads)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits)
    assert_save_load_same_logits(model, tiny_model("llama", num_layers=2), tmp_path / "a", ids)


@pytest.mark.parametrize("opts,match", [
    ({"noise_std": -0.1}, r"noise_std=-0.1 must be a number in \[0, 1000\]"),
    ({"expert_dropout": 1.0}, r"expert_dropout=1.0 must be a number in \[0, 1\)"),
    ({"top_p": 0.5}, r"router 'noisy_topk' has no option 'top_p'"),
])
def test_noisy_topk_bad_options_are_refused_naming_the_allowed_values(opts, match):
    with pytest.raises(AllocationError, match=match):
        MoLoRAConfig(num_experts=4, top_k=2, r=2, router="noisy_topk", router_options=opts)
