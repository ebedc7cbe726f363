"""One shrink for sibling projections (q/k/v, gate/up): the shared op against the per-module reference (outputs and
all gradients, with and without dropout, fp32 and bf16/fp16 autocast), and at model level against
share_sibling_shrink=False (with checkpointing, fallbacks, save/load)."""
from __future__ import annotations

import pytest
import torch

from molora_kernels import route
from molora_kernels import siblings as sib
from molora_kernels import torch_dense

MEMBERS = [(4, 2, 3, 24), (6, 3, 2, 16), (2, 1, 4, 24)]  # (E, k, r, d_out): unequal sizes on purpose
D_IN, T = 20, 13


def _operands(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ops = []
    for e, k, r, d_out in MEMBERS:
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype).requires_grad_(True)  # noqa: E731
        ops.append(sib.SiblingOperands(a_all=mk(e * r, D_IN), b_all=mk(d_out, e * r), router_weight=mk(e, D_IN),
                                       top_k=k, scaling=1.5, router="topk"))
    x = (torch.randn(T, D_IN, generator=g)).to(dtype).requires_grad_(True)
    return x, ops


def _reference(x, ops, p, seed):
    """Each member alone in plain PyTorch (torch_dense), every member's shrink drawing the same dropout mask."""
    outs = []
    for m in ops:
        torch.manual_seed(seed)
        h, logits = torch_dense.shrink_and_logits(x, m.a_all, m.router_weight, p, p > 0)
        routing = route(logits, m.top_k, m.router)
        outs.append((torch_dense.gate_expand(h, routing.gates, m.b_all, m.scaling), routing.probs))
    return outs


def _grads(x, ops, outs, seed):
    g = torch.Generator().manual_seed(seed + 100)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() + (pr * torch.randn(pr.shape, generator=g)).sum()
               for o, pr in outs)  # random weights on the probabilities too (their plain sum is constant)
    tensors = [x] + [t for m in ops for t in (m.a_all, m.b_all, m.router_weight)]
    return torch.autograd.grad(loss.float(), tensors)


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_shared_shrink_equals_per_module_reference(p, precision):
    """Outputs, router probabilities (the aux loss's path) and the gradients of x and of every member's A, B and
    router equal the per-module computation; with dropout the reference's members all get the group's mask."""
    seed = 7
    x, ops = _operands(3)
    tol = 1e-5
    ctx = torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16) \
        if precision != "fp32" else torch.autocast("cpu", enabled=False)
    with ctx:
        dt = torch.get_autocast_dtype("cpu") if precision != "fp32" else torch.float32
        torch.manual_seed(seed)
        with torch.autocast("cpu", enabled=False):
            got = sib.moe_lora_siblings(x.to(dt), ops, dropout=p, training=True)
        got = [(o, r.probs) for o, r in got]
        g_got = _grads(x, ops, got, seed)
    with torch.autocast("cpu", enabled=False):
        ref = _reference(x.to(dt), ops, p, seed)
        g_ref = _grads(x, ops, ref, seed)
    if precision != "fp32":
        tol = 1e-2  # same low-precision inputs; GEMM accumulation order differs
    for (o, pr), (ro, rpr) in zip(got, ref, strict=True):
        torch.testing.assert_close(o.float(), ro.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(pr, rpr, rtol=tol, atol=tol)
    names = ["x"] + [f"{w}{i}" for i in range(len(ops)) for w in ("A", "B", "W")]
    for n, a, b in zip(names, g_got, g_ref, strict=True):
        scale = b.abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale) <= tol * 4, n
    if p > 0:  # the mask really is shared: members differ from an undropped computation in the same places
        torch.manual_seed(seed)
        mask = torch.nn.functional.dropout(torch.ones(T, D_IN), p=p, training=True)
        assert (mask == 0).any()


def test_shared_dropout_mask_is_replayed_not_stored():
    """The backward replays the dropout draw from the saved RNG state: nothing of size [T, d_in] besides x is
    saved, and the run's RNG stream after the call is where one F.dropout(x) leaves it."""
    x, ops = _operands(5)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sib.moe_lora_siblings(x, ops, dropout=0.2, training=True)
    after = torch.rand(1)
    torch.manual_seed(1)
    torch.nn.functional.dropout(x, p=0.2, training=True)
    assert torch.equal(after, torch.rand(1))
    assert saved.count((T, D_IN)) == 1  # x once (by the shared shrink)


# ----------------------------------------------------------------------------------------------- model level
def _model(tiny_model, share, dropout=0.0, **kw):
    import molora
    from peft import get_peft_model

    base = tiny_model("llama", num_layers=2)
    cfg = molora.MoLoRAConfig(num_experts="2,4", top_k=2, r=4, init_weights=False, lora_dropout=dropout,
                              share_sibling_shrink=share, **kw)
    torch.manual_seed(3)
    model = get_peft_model(base, cfg)
    model.train()
    return model


def _step(model, seed=0):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_calls(monkeypatch):
    calls = {"siblings": 0, "moe_lora": 0}
    import molora.tuner.layer as layer_mod
    import molora.tuner.siblings as tuner_sib

    real_sib, real_op = tuner_sib.moe_lora_siblings, layer_mod.moe_lora

    def counted_sib(*a, **k):
        calls["siblings"] += 1
        return real_sib(*a, **k)

    def counted_op(*a, **k):
        calls["moe_lora"] += 1
        return real_op(*a, **k)

    monkeypatch.setattr(tuner_sib, "moe_lora_siblings", counted_sib)
    monkeypatch.setattr(layer_mod, "moe_lora", counted_op)
    return calls


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_model_with_shared_shrink_equals_per_module(tiny_model, monkeypatch, checkpointing):
    """Loss (with the aux term) and every adapter gradient equal share_sibling_shrink=False; q/k/v and gate/up run
    as 2 shared calls per layer, o/down on their own."""
    ref_loss, ref_grads = _step(_model(tiny_model, share=False))
    model = _model(tiny_model, share=True)
    assert [g.names()[0].rsplit(".", 1)[1] for g in model.base_model.sibling_groups] == ["q_proj", "gate_proj"] * 2
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    calls = _count_calls(monkeypatch)
    loss, grads = _step(model)
    if checkpointing is None:
        assert calls == {"siblings": 4, "moe_lora": 4}
    else:
        assert calls["siblings"] >= 4 and calls["moe_lora"] >= 4
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_model_with_shared_dropout_trains_and_differs_only_by_the_masks(tiny_model):
    """With dropout the shared path draws one mask per group: in eval (no dropout) both configurations agree
    exactly, in training both give finite, different losses."""
    a, b = _model(tiny_model, share=True, dropout=0.3), _model(tiny_model, share=False, dropout=0.3)
    la, ga = _step(a)
    lb, gb = _step(b)
    assert torch.isfinite(la) and torch.isfinite(lb) and la != lb
    assert all(torch.isfinite(g).all() for g in ga.values())
    a.eval(), b.eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_groups_fall_back_to_per_module_where_sharing_would_differ(tiny_model, monkeypatch):
    """A group member on another backend (sparse), or with the adapters disabled: the per-module op runs, with the
    same results."""
    model = _model(tiny_model, share=True)
    ref_loss, _ = _step(_model(tiny_model, share=False))
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    k_proj.backend["default"] = "sparse"
    calls = _count_calls(monkeypatch)
    loss, _ = _step(model)
    assert calls["siblings"] == 3 and calls["moe_lora"] == 4 + 3  # layer 0's q/k/v each on its own
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    with model.disable_adapter():
        calls.update(siblings=0, moe_lora=0)
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        assert calls == {"siblings": 0, "moe_lora": 0}


def test_share_sibling_shrink_round_trips_and_old_configs_default_to_it(tiny_model, tmp_path):
    import json

    from peft import PeftModel

    model = _model(tiny_model, share=False)
    model.save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    assert json.loads(cfg_path.read_text())["share_sibling_shrink"] is False
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_layers=2), tmp_path / "a")
    assert loaded.base_model.sibling_groups == []
    cfg = json.loads(cfg_path.read_text())
    del cfg["share_sibling_shrink"]  # an adapter saved before the option existed
    cfg_path.write_text(json.dumps(cfg))
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_layers=2), tmp_path / "a")
    assert len(loaded.base_model.sibling_groups) == 4
