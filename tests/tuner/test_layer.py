"""The MoLoRA layer against the math of docs/design.md §2, written out naively here; E = 1 against PEFT's LoRA;
the MoLA aux loss (value and gradient) against a direct computation, with and without gradient checkpointing."""
from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import molora
from molora import MoLoRAConfig, MoLoRALinear
from molora.tuner.router_state import RouterCollector
from molora_kernels import available_backends

D_IN, D_OUT, ALPHA, COEF = 16, 12, 6.0, 10.0  # a large coef makes the aux gradient visible
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKENDS = sorted({"auto", *available_backends("cpu")} - {b for b in available_backends("cpu") if "triton" in b})


# --------------------------------------------------------------------------- the reference
def reference(x, weight, bias, a_all, b_all, w_router, *, num_experts, top_k, r, alpha, router, mask=None):
    """Naive MoLoRA of docs/design.md §2, token by token and expert by expert, in float32.

    Returns (y, aux): y = base + alpha/r * sum_j g_j * B_j (A_j x) per token, and the MoLA aux loss of this single
    module, E * sum_e f_e * mean_t P[t, e], over the tokens where ``mask`` is true; 0 when E <= top_k (every token
    takes every expert: nothing to balance, the term would be the constant E / k).
    """
    xs = x.reshape(-1, x.shape[-1])
    scaling = alpha / r
    base = xs @ weight.t()
    if bias is not None:
        base = base + bias
    probs = torch.softmax((xs @ w_router.t()).float(), dim=-1)
    rows, chosen = [], []
    for t in range(xs.shape[0]):
        if router == "topk":
            vals, idx = torch.topk(probs[t], top_k)
            gates = vals / vals.sum()
        else:
            idx, gates = torch.arange(num_experts), probs[t]
        chosen.append(idx)
        y = base[t]
        for j, e in enumerate(idx.tolist()):
            a_e = a_all[e * r:(e + 1) * r]          # [r, d_in]
            b_e = b_all[:, e * r:(e + 1) * r]       # [d_out, r]
            y = y + scaling * gates[j] * (b_e @ (a_e @ xs[t]))
        rows.append(y)
    out = torch.stack(rows).reshape(*x.shape[:-1], weight.shape[0])
    keep = torch.ones(xs.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    counts = torch.zeros(num_experts)
    for t in range(xs.shape[0]):
        if keep[t]:
            counts[chosen[t]] += 1
    n = int(keep.sum())
    f = counts / (top_k * n)
    p_mean = probs[keep].sum(0) / n
    aux = num_experts * (f * p_mean).sum() if num_experts > top_k else torch.zeros(())
    return out, aux


def topk_margin(logits: torch.Tensor, top_k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th largest logit over the tokens (inf when k == E)."""
    if top_k >= logits.shape[-1]:
        return float("inf")
    s = logits.detach().sort(dim=-1, descending=True).values
    return float((s[:, top_k - 1] - s[:, top_k]).min())


def make_case(num_experts, top_k, r, shape, *, bias=True, router="topk", dtype=torch.float32, adapter_dtype=None,
              dropout=0.0, backend="auto", margin=1e-3, seed=0):
    """A MoLoRA layer and an input whose top-k choice is unambiguous (logit margin) at the given precision."""
    adapter_dtype = adapter_dtype or dtype
    for s in range(seed, seed + 1000):
        torch.manual_seed(s)
        base = nn.Linear(D_IN, D_OUT, bias=bias)
        base.requires_grad_(False)
        layer = MoLoRALinear(base, "default", layer_index=0, module_name="blocks.0.proj", num_experts=num_experts,
                             top_k=top_k, r=r, lora_alpha=ALPHA, lora_dropout=dropout, router=router,
                             aux_loss_coef=COEF, aux_loss_mode="masked", backend=backend, init_weights=False)
        layer.base_layer.to(dtype)
        for n, p in layer.named_parameters():
            if p.requires_grad or "molora_router" in n:  # the adapter's weights (a one-expert router is frozen)
                p.data = p.data.to(adapter_dtype)
        x = torch.randn(*shape, D_IN).to(dtype)
        logits = x.float().reshape(-1, D_IN) @ layer.molora_router["default"].float().t()
        if router == "soft" or topk_margin(logits, top_k) > margin:
            return layer, x
    raise AssertionError("no input with an unambiguous top-k found")


def params(layer):
    return layer.molora_A["default"], layer.molora_B["default"], layer.molora_router["default"]


def run_layer(layer, x, mask, upstream, coef_in_loss):
    """Forward + backward of the layer with a collector attached (as inside a MoLoRA model)."""
    for p in params(layer):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    collector = RouterCollector()
    layer.collector = collector
    collector.start_forward(mask)
    y = layer(x)
    aux = collector.current.aux_loss()  # a value; its gradient reaches the routers through the layer's backward
    loss = (y.float() * upstream).sum() + (coef_in_loss * aux if coef_in_loss else 0.0)
    loss.backward()
    stats = collector.current.layers[0].stats[0]
    # a one-expert router is frozen (molora declares it so: it gets no gradient); the reference must agree: 0
    return y, aux, [x.grad] + [p.grad if p.requires_grad else torch.zeros_like(p) for p in params(layer)], stats


def run_reference(layer, x, mask, upstream, router, with_aux):
    a, b, w = (p.detach().float().clone().requires_grad_(True) for p in params(layer))
    xr = x.detach().float().clone().requires_grad_(True)
    base = layer.base_layer
    y, aux = reference(xr, base.weight.float(), None if base.bias is None else base.bias.float(), a, b, w,
                       num_experts=layer.num_experts["default"], top_k=layer.top_k["default"], r=layer.r["default"],
                       alpha=ALPHA, router=router, mask=mask)
    loss = (y * upstream).sum() + (COEF * aux if with_aux else 0.0)
    loss.backward()
    return y, aux, [xr.grad, a.grad, b.grad, w.grad]


def assert_close(actual, expected, tol, what=""):
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, what
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-3)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


CASES = [(4, 2, 4), (8, 2, 3), (3, 3, 2), (1, 1, 4), (6, 1, 1), (5, 4, 8)]  # (E, k, r): incl. E == k and E == 1
GRAD_NAMES = ("x", "A_all", "B_all", "router")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["topk", "soft"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(10,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("E,k,r", CASES)
def test_layer_matches_reference_fp32(E, k, r, shape, bias, router, backend):
    layer, x = make_case(E, k, r, shape, bias=bias, router=router, backend=backend)
    mask = None
    if len(shape) == 2:  # padding: excluded from the aux statistics, not from the output
        mask = torch.ones(shape, dtype=torch.bool)
        mask[1, :2] = False
    upstream = torch.randn(*shape, D_OUT)
    with_aux = router == "topk"
    results = {}
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        y, aux, grads, stats = run_layer(layer, x, mask, upstream, COEF if with_aux else 0.0)
        y_ref, aux_ref, grads_ref = run_reference(layer, x, mask, upstream, router, with_aux)
        assert y.dtype == x.dtype and y.shape == (*shape, D_OUT)
        assert_close(y, y_ref, 2e-5, f"{mode} output")
        if with_aux:
            assert_close(aux, aux_ref, 1e-5, f"{mode} aux")
        for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
            assert g is not None, name
            assert_close(g, g_ref, 5e-5, f"{mode} grad {name}")
        assert stats.prob_sum.dtype == torch.float32
        results[mode] = (y, grads)
    # without dropout, train and eval are the same computation
    torch.testing.assert_close(results["train"][0], results["eval"][0])


def test_aux_gradient_is_not_negligible_in_these_tests():
    """The layer tests above would not notice a missing aux gradient if it were tiny: check it is not."""
    layer, x = make_case(4, 2, 4, (2, 5))
    upstream = torch.randn(2, 5, D_OUT)
    _, _, with_aux = run_reference(layer, x, None, upstream, "topk", True)
    _, _, without = run_reference(layer, x, None, upstream, "topk", False)
    diff = (with_aux[3] - without[3]).abs().max() / without[3].abs().max()
    assert diff > 0.05
    _, _, grads, _ = run_layer(layer, x, None, upstream, COEF)
    assert_close(grads[3], with_aux[3], 5e-5, "router grad")


LOW_CASES = [(4, 2, 4), (3, 3, 2), (1, 1, 4), (8, 3, 2)]


@pytest.mark.parametrize("backend,adapter_fp32", [("auto", True)] + [(b, False) for b in BACKENDS],
                         ids=lambda v: {True: "adapter_fp32", False: "adapter_lowp"}.get(v, v))
@pytest.mark.parametrize("router", ["topk", "soft"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("E,k,r", LOW_CASES)
def test_layer_matches_reference_low_precision(E, k, r, dtype, router, backend, adapter_fp32):
    layer, x = make_case(E, k, r, (2, 6), dtype=dtype, adapter_dtype=torch.float32 if adapter_fp32 else dtype,
                         router=router, margin=0.05, backend=backend)
    tol = 4e-2 if dtype == torch.bfloat16 else 8e-3
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, -1] = False
    upstream = torch.randn(2, 6, D_OUT)
    with_aux = router == "topk"
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        y, aux, grads, stats = run_layer(layer, x, mask, upstream, COEF if with_aux else 0.0)
        y_ref, aux_ref, grads_ref = run_reference(layer, x, mask, upstream, router, with_aux)
        assert y.dtype == dtype
        assert stats.prob_sum.dtype == torch.float32 and stats.counts.dtype == torch.float32  # router in fp32
        assert_close(y, y_ref, tol, f"{mode} output")
        if with_aux:
            assert_close(aux, aux_ref, tol, f"{mode} aux")
        for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
            assert g.dtype == (x.dtype if name == "x" else layer.molora_A["default"].dtype)
            assert_close(g, g_ref, 2 * tol, f"{mode} grad {name}")


def test_dropout_only_on_the_experts_input():
    layer, x = make_case(4, 2, 4, (2, 5), dropout=0.5)
    upstream = torch.randn(2, 5, D_OUT)
    layer.eval()  # eval: no dropout at all
    y_eval, _, _, stats_eval = run_layer(layer, x, None, upstream, COEF)
    y_ref, _, _ = run_reference(layer, x, None, upstream, "topk", True)
    assert_close(y_eval, y_ref, 2e-5, "eval output with dropout configured")
    layer.train()
    torch.manual_seed(123)
    y_train, _, _, stats_train = run_layer(layer, x, None, upstream, COEF)
    assert not torch.allclose(y_train, y_eval)  # dropout acts on the experts in training
    # ... but the router sees x without dropout: same probabilities and choices as in eval
    torch.testing.assert_close(stats_train.prob_sum, stats_eval.prob_sum)
    torch.testing.assert_close(stats_train.counts, stats_eval.counts)


def test_mola_init_starts_as_the_base_layer():
    layer, x = make_case(4, 2, 4, (3, D_IN // 4))
    layer.reset_parameters("default", init_weights=True)  # MoLA init: B = 0, the layer starts as the base layer
    assert torch.count_nonzero(layer.molora_B["default"]) == 0
    assert torch.count_nonzero(layer.molora_A["default"]) > 0 and torch.count_nonzero(layer.molora_router["default"]) > 0
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- E = 1 is PEFT's LoRA
def test_single_expert_equals_peft_lora(tiny_model):
    base = tiny_model("llama", num_layers=2)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=LLAMA_TARGETS, init_lora_weights=False))
    mol = get_peft_model(copy.deepcopy(base), MoLoRAConfig(num_experts=1, top_k=1, r=4, lora_alpha=8,
                                                           target_modules=LLAMA_TARGETS, init_weights=False))
    lora_layers = {n: m for n, m in lora.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    mol_layers = {n: m for n, m in mol.named_modules() if isinstance(m, MoLoRALinear)}
    assert sorted(lora_layers) == sorted(mol_layers) and len(mol_layers) == 2 * len(LLAMA_TARGETS)
    with torch.no_grad():
        for name, m in mol_layers.items():
            lora_layers[name].lora_A["default"].weight.copy_(m.molora_A["default"])
            lora_layers[name].lora_B["default"].weight.copy_(m.molora_B["default"])
            assert lora_layers[name].scaling["default"] == m.scaling["default"] == 2.0
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    lora.train(), mol.train()
    out_l = lora(input_ids=ids, attention_mask=mask, labels=labels)
    out_m = mol(input_ids=ids, attention_mask=mask, labels=labels)
    assert not torch.allclose(out_l.logits, base(input_ids=ids, attention_mask=mask).logits, atol=1e-3)  # adapted
    torch.testing.assert_close(out_m.logits, out_l.logits, rtol=1e-5, atol=1e-5)
    task_m = out_m.loss - mol.peft_config["default"].aux_loss_coef * out_m.get("aux_loss", 0.0)
    torch.testing.assert_close(task_m, out_l.loss, rtol=1e-5, atol=1e-6)
    out_l.loss.backward()
    out_m.loss.backward()
    for name, m in mol_layers.items():
        la = lora_layers[name]
        torch.testing.assert_close(m.molora_A["default"].grad, la.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.molora_B["default"].grad, la.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
        r_grad = m.molora_router["default"].grad
        assert r_grad is None or torch.count_nonzero(r_grad) == 0  # one expert: the gate is always 1


# --------------------------------------------------------------------------- the aux loss of a model
def capture_inputs(model):
    """Record (module, input) of every MoLoRA module call (inputs keep their graph)."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0])))
             for m in model.modules() if isinstance(m, MoLoRALinear)]
    return calls, hooks


def forward_capturing(model, ids, mask, labels):
    """``model``'s output on the batch and the (module, input) of every MoLoRA call it made."""
    calls, hooks = capture_inputs(model)
    try:
        return model(input_ids=ids, attention_mask=mask, labels=labels), calls
    finally:
        for h in hooks:
            h.remove()


def direct_aux(calls, token_mask, adapter="default"):
    """MoLA aux loss from the formula: per decoder layer, concatenate the router logits of all its MoLoRA modules
    along tokens, P = softmax, f_e = fraction of top-k selections (no gradient), P̄_e = mean P; sum E * Σ f·P̄ over
    the layers with a choice to balance (E > k; a layer with E <= k adds the constant E / k, left out)."""
    by_layer = defaultdict(list)
    for mod, x in calls:
        by_layer[mod.layer_index].append((mod, x))
    total = torch.zeros(())
    for layer, items in sorted(by_layer.items()):
        mod0 = items[0][0]
        E, k = mod0.num_experts[adapter], mod0.top_k[adapter]
        if E <= k:
            continue
        logits = torch.cat([x.reshape(-1, x.shape[-1]) @ mod.molora_router[adapter].t() for mod, x in items])
        keep = None if token_mask is None else token_mask.reshape(-1).bool().repeat(len(items))
        if keep is not None:
            logits = logits[keep]
        probs = torch.softmax(logits.float(), dim=-1)
        idx = torch.topk(probs, k, dim=-1).indices
        f = F.one_hot(idx, E).sum((0, 1)).float() / (k * probs.shape[0])
        total = total + E * (f.detach() * probs.mean(0)).sum()
    return total


def causal_lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def aux_model(tiny_model, coef, mode="masked", task_type=None, num_layers=4):
    base = tiny_model("llama", num_layers=num_layers)
    config = MoLoRAConfig(num_experts="2,3,4,6", top_k="2,1,2,3", r=2, lora_alpha=4, aux_loss_coef=coef,
                          aux_loss_mode=mode, init_weights=False, task_type=task_type)
    model = get_peft_model(base, config)
    model.train()
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return ids, mask, ids.masked_fill(mask == 0, -100)


def router_params(model):
    return {n: p for n, p in model.named_parameters() if "molora_router" in n}


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
@pytest.mark.parametrize("mode", ["masked", "original"])
def test_aux_loss_value_matches_formula(tiny_model, mode, task_type):
    model = aux_model(tiny_model, coef=0.01, mode=mode, task_type=task_type)
    ids, mask, labels = batch()
    out, calls = forward_capturing(model, ids, mask, labels)
    assert len(calls) == 4 * len(LLAMA_TARGETS)
    expected = direct_aux(calls, mask if mode == "masked" else None)
    torch.testing.assert_close(model.base_model.last_aux_loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["aux_loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    # the loss the model returns is task loss + coef * aux
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels) + 0.01 * expected.detach(),
                               rtol=1e-5, atol=1e-6)
    # padding makes a difference here, so the two modes are really different computations
    other = direct_aux(calls, None if mode == "masked" else mask)
    assert abs(other.item() - expected.item()) > 1e-4


def test_aux_loss_uniform_router_is_one_per_layer(tiny_model):
    model = aux_model(tiny_model, coef=0.01)
    for m in model.modules():
        if isinstance(m, MoLoRALinear):
            nn.init.zeros_(m.molora_router["default"])  # uniform softmax: E * sum_e f_e / E = 1 per layer
    ids, mask, labels = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels)
    # layers 1-3 (E > k); layer 0 (E = k = 2: every token takes both experts) has nothing to balance
    torch.testing.assert_close(model.base_model.last_aux_loss, torch.tensor(3.0))


@pytest.mark.parametrize("experts,top_k", [("1", "1"), ("2,2,1,1", "2,2,1,1"), ("1,4,1,4", "1,2,1,2")])
def test_aux_loss_leaves_out_layers_without_a_choice(tiny_model, experts, top_k):
    """A layer with one expert, or with E <= k, has nothing to balance: its constant E / k term is left out of the
    aux loss and of the model's loss, so a LoRA-shaped adapter (E = 1 everywhere) reports 0 and its loss is the
    task loss (it added 1 per layer before), and allocations compare by the layers that route."""
    base = tiny_model("llama", num_layers=4)
    model = get_peft_model(base, MoLoRAConfig(num_experts=experts, top_k=top_k, r=2, lora_alpha=4,
                                              aux_loss_coef=0.5, init_weights=False))
    model.train()
    ids, mask, labels = batch()
    out, calls = forward_capturing(model, ids, mask, labels)
    expected = direct_aux(calls, mask)
    routed = "4" in experts
    assert (expected.item() > 1.0) == routed  # the two E = 4, k = 2 layers: about 1 each
    torch.testing.assert_close(out["aux_loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels) + 0.5 * expected.detach(),
                               rtol=1e-5, atol=1e-6)
    out.loss.backward()
    per_layer = (experts.split(",") * 4)[:4]
    for n, p in router_params(model).items():  # a one-expert router gets no gradient, from either loss
        if per_layer[int(n.split(".layers.")[1].split(".")[0])] == "1":
            assert p.grad is None or not p.grad.any(), n


def reference_router_grads(tiny_model, model_with_aux, coef, mode, ids, mask, labels):
    """Router (and every adapter) gradient of task_loss + coef * aux_direct on a copy with the built-in aux off."""
    ref = aux_model(tiny_model, coef=0.0, mode=mode)
    ref.load_state_dict(model_with_aux.state_dict())
    calls, hooks = capture_inputs(ref)
    out = ref(input_ids=ids, attention_mask=mask, labels=labels)
    for h in hooks:
        h.remove()
    aux = direct_aux(calls, mask if mode == "masked" else None)
    task = out.loss
    torch.testing.assert_close(task, causal_lm_loss(out.logits, labels))  # coef 0: nothing added
    params = adapter_params(ref)
    g_task = torch.autograd.grad(task, list(params.values()), retain_graph=True, allow_unused=True)
    g_aux = torch.autograd.grad(aux, list(params.values()), allow_unused=True)
    zero = torch.zeros(())
    return {n: (gt if gt is not None else zero) + coef * (ga if ga is not None else zero)
            for n, gt, ga in zip(params, g_task, g_aux, strict=True)}, {n: ga for n, ga in zip(params, g_aux, strict=True)}


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
@pytest.mark.parametrize("mode", ["masked", "original"])
def test_aux_gradient_matches_autograd_of_formula(tiny_model, mode, checkpointing):
    coef = 0.5  # large, so that the aux part of the router gradient is clearly visible
    model = aux_model(tiny_model, coef=coef, mode=mode)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
        assert model.base_model.model.model.gradient_checkpointing
    ids, mask, labels = batch()
    expected, aux_only = reference_router_grads(tiny_model, model, coef, mode, ids, mask, labels)
    calls, hooks = capture_inputs(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    for h in hooks:
        h.remove()
    n = 4 * len(LLAMA_TARGETS)
    assert len(calls) > n if checkpointing else len(calls) == n  # checkpointing recomputes (non-reentrant: early stop)
    got = adapter_params(model)
    routers = router_params(model)
    assert len(routers) == 4 * len(LLAMA_TARGETS)
    for name, p in got.items():
        assert p.grad is not None, name
        assert_close(p.grad, expected[name], 1e-4, name)
    # the aux term really contributes to the router gradients compared here (layers with E > k)
    visible = [n for n in routers if aux_only[n] is not None and coef * aux_only[n].abs().max() > 0.05 * expected[n].abs().max()]
    assert len(visible) >= len(LLAMA_TARGETS)


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
@pytest.mark.parametrize("scaling", ["times_8", "grad_scaler", "ga_and_multiplier"])
def test_aux_gradient_follows_loss_scaling(tiny_model, scaling, checkpointing):
    """Whatever scales the returned loss scales the injected aux gradient too: loss * 8, fp16-style loss scaling
    with a GradScaler (grads unscaled before comparing), and 1/GA with an extra record multiplier."""
    coef = 0.5
    model = aux_model(tiny_model, coef=coef)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    ids, mask, labels = batch()
    expected, aux_only = reference_router_grads(tiny_model, model, coef, "masked", ids, mask, labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    factor = 1.0
    if scaling == "times_8":
        (out.loss * 8).backward()
        factor = 8.0
    elif scaling == "grad_scaler":
        params = list(adapter_params(model).values())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        scaler.scale(out.loss).backward()
        scaler.unscale_(torch.optim.SGD(params, lr=0.0))
    else:  # what the Trainer's token-normalised path does: loss / 4 reaches the model, aux also gets 1/2
        model.base_model.collector.current.grad_multiplier = 0.5
        (out.loss / 4).backward()
        factor = None
    for name, p in adapter_params(model).items():
        want = expected[name] * factor if factor is not None else (
            (expected[name] - coef * aux_only[name]) / 4 + coef * aux_only[name] / 8
            if aux_only[name] is not None else expected[name] / 4)
        assert_close(p.grad, want, 1e-4, name)


def test_aux_gradient_without_the_returned_loss_uses_factor_one(tiny_model):
    """A custom loss on the logits (the model's loss unused): the injected aux gradient has weight coef."""
    coef = 0.5
    model = aux_model(tiny_model, coef=coef)
    ids, mask, labels = batch()
    expected, _ = reference_router_grads(tiny_model, model, coef, "masked", ids, mask, labels)
    out = model(input_ids=ids, attention_mask=mask)
    assert out.loss is None
    causal_lm_loss(out.logits, labels).backward()
    for name, p in adapter_params(model).items():
        assert_close(p.grad, expected[name], 1e-4, name)


@pytest.mark.parametrize("checkpointing", [
    None,
    pytest.param("reentrant", marks=pytest.mark.xfail(strict=True, reason=(
        "known limitation: reentrant recomputation runs inside backward and takes the statistics and token mask of "
        "the latest forward (RouterCollector.current), not of the forward being recomputed"))),
    "non_reentrant",
])
def test_aux_gradient_with_gradient_accumulation(tiny_model, checkpointing):
    """Two forwards before one backward: each forward's aux gradient uses its own statistics."""
    coef = 0.5
    model = aux_model(tiny_model, coef=coef)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    ids, mask, labels = batch(1)
    ids2, mask2, labels2 = batch(2)
    exp1, _ = reference_router_grads(tiny_model, model, coef, "masked", ids, mask, labels)
    exp2, _ = reference_router_grads(tiny_model, model, coef, "masked", ids2, mask2, labels2)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss = loss + model(input_ids=ids2, attention_mask=mask2, labels=labels2).loss
    loss.backward()
    for name, p in router_params(model).items():
        assert_close(p.grad, exp1[name] + exp2[name], 1e-4, name)


@pytest.mark.parametrize("router,opts", [("topk", None), ("topp", {"top_p": 0.8, "entropy_coef": 1e-3})])
def test_a_layer_resolves_its_router_and_options_once(tiny_model, monkeypatch, router, opts):
    """Issue 22.4: the router object and its options are resolved when the adapter is attached; in a training
    forward and backward (siblings sharing, aux loss, regulariser) neither the layer nor the op's dispatch looks the
    router up by name again (the routing function itself still fills and range-checks its float options)."""
    from molora_kernels import backends, ops, routers

    model = get_peft_model(tiny_model("llama", num_layers=2),
                           MoLoRAConfig(num_experts=4, top_k=2, r=4, router=router, router_options=opts))
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, MoLoRALinear))
    assert layer.routers["default"] is routers.get_router(router)

    def refused(*a, **k):
        raise AssertionError("looked up or checked again in a forward")

    for mod in (ops, backends, molora.tuner.layer):
        monkeypatch.setattr(mod, "get_router", refused)
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and layer.molora_router["default"].grad is not None
