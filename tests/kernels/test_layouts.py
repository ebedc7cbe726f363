"""Expert layouts (issue 10): HydraLoRA's shared A against a per-token reference and against the stacked layout
with A repeated, with gradients; refusals; save/load; an adapter loads only into its own layout."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import assert_save_load_same_logits
from molora import AllocationError, MoLoRAConfig, allocation_table
from molora_kernels import LAYOUTS, get_layout, moe_lora


def _inputs(seed=0, T=16, d_in=12, d_out=10, E=4, r=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, requires_grad=True) for s in ((T, d_in), (r, d_in), (d_out, E * r),
                                                                       (E, d_in))]


def _naive_hydra(x, a, b, w, k, scaling):
    """Per token: p = softmax(x W^T), top-k renormalised; y = s * sum_j g_j B_{e_j} (A x) with one shared A."""
    r = a.shape[0]
    out = []
    for t in range(x.shape[0]):
        p = torch.softmax(x[t] @ w.t(), -1)
        v, i = torch.topk(p, k)
        g = v / v.sum()
        h = a @ x[t]
        out.append(scaling * sum(g[j] * (b[:, i[j] * r:(i[j] + 1) * r] @ h) for j in range(k)))
    return torch.stack(out)


def test_the_registry_states_shapes_and_backends():
    assert get_layout("stacked").a_rows(4, 8) == 32 and get_layout("shared_a").a_rows(4, 8) == 8
    assert "sparse" not in LAYOUTS["shared_a"].backends
    with pytest.raises(ValueError, match=r"layout='hydra' is not a known expert layout; allowed: stacked, shared_a"):
        get_layout("hydra")


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_shared_a_matches_the_per_token_reference_with_gradients(backend):
    x, a, b, w = _inputs()
    up = torch.randn(x.shape[0], b.shape[0], generator=torch.Generator().manual_seed(1))
    out = moe_lora(x, a, b, w, top_k=2, scaling=0.5, layout="shared_a", backend=backend)
    want = _naive_hydra(x, a, b, w, 2, 0.5)
    torch.testing.assert_close(out.delta, want, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad((out.delta * up).sum() + out.stats.prob_sum.sum() * 0.3, (x, a, b, w))
    prob_sum = torch.softmax(x @ w.t(), -1).sum(0)
    ref = torch.autograd.grad((want * up).sum() + prob_sum.sum() * 0.3, (x, a, b, w))
    for name, gg, rr in zip("xabw", got, ref, strict=True):
        torch.testing.assert_close(gg, rr, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("router,opts", [("topk", None), ("soft", None), ("topp", {"top_p": 0.7}),
                                         ("switch", {"capacity_factor": 1.0})])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_shared_a_is_the_stacked_layout_with_a_repeated(router, opts, dropout):
    """Exactly: the stacked op with A_all = [A; A; ...] gives the same output, and A's gradient is the sum of the
    repeated blocks' gradients (same dropout draw: same seed)."""
    x, a, b, w = _inputs(seed=2)
    k = 1 if router == "switch" else 2
    kw = dict(top_k=k, scaling=1.5, router=router, router_options=opts, dropout=dropout, training=True)
    torch.manual_seed(7)
    shared = moe_lora(x, a, b, w, layout="shared_a", backend="reference", **kw)
    a_rep = a.detach().repeat(w.shape[0], 1).requires_grad_(True)
    torch.manual_seed(7)
    stacked = moe_lora(x, a_rep, b, w, layout="stacked", backend="reference", **kw)
    torch.testing.assert_close(shared.delta, stacked.delta, rtol=1e-4, atol=1e-5)
    (ga,) = torch.autograd.grad(shared.delta.sum(), (a,))
    (gr,) = torch.autograd.grad(stacked.delta.sum(), (a_rep,))
    torch.testing.assert_close(ga, gr.view(w.shape[0], a.shape[0], -1).sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_a_under_autocast_matches_the_reference_in_that_dtype(dtype):
    """Under autocast: the shared layout against the stacked reference with A repeated, in the same dtype
    (outputs and every gradient; A's is the sum over the repeated blocks)."""
    x, a, b, w = _inputs(seed=3)
    a_rep = a.detach().repeat(w.shape[0], 1).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out = moe_lora(x, a, b, w, top_k=2, scaling=1.0, layout="shared_a")
        ref = moe_lora(x, a_rep, b, w, top_k=2, scaling=1.0, backend="reference")
    assert out.delta.dtype == dtype
    torch.testing.assert_close(out.delta, ref.delta, rtol=1e-2, atol=1e-2)
    got = torch.autograd.grad(out.delta.float().sum(), (x, a, b, w))
    want = torch.autograd.grad(ref.delta.float().sum(), (x, a_rep, b, w))
    want = (want[0], want[1].view(w.shape[0], a.shape[0], -1).sum(0), want[2], want[3])
    for name, g, r in zip("xabw", got, want, strict=True):  # 16-bit sums in another order: compare relative to the norm
        rel = float((g.float() - r.float()).norm() / r.float().norm())
        assert rel < 1e-2, (name, rel)


def test_bad_layout_values_are_refused_naming_the_allowed_ones():
    x, a, b, w = _inputs()
    with pytest.raises(ValueError, match="backend 'sparse' does not implement layout 'shared_a'; backends for it: "
                                         "torch, reference"):
        moe_lora(x, a, b, w, top_k=2, scaling=1.0, layout="shared_a", backend="sparse")
    with pytest.raises(ValueError, match=r"layout 'shared_a': b \(10, 8\) must be \[d_out, E·r=12\]"):
        moe_lora(x, a, b[:, :8], w, top_k=2, scaling=1.0, layout="shared_a")
    with pytest.raises(ValueError, match=r"layout 'shared_a': a \(3, 11\) must be \[r, d_in=12\] with E=4"):
        moe_lora(x, a[:, :11], b, w, top_k=2, scaling=1.0, layout="shared_a")
    with pytest.raises(AllocationError, match=r"layout='hydra' is not a known expert layout; allowed: stacked, "
                                              r"shared_a"):
        MoLoRAConfig(layout="hydra")
    with pytest.raises(AllocationError, match=r"backend='triton' does not implement layout='shared_a'"):
        MoLoRAConfig(layout="shared_a", backend="triton")


def test_shared_a_model_counts_saves_loads_and_refuses_another_layout(tiny_model, tmp_path):
    cfg = dict(num_experts=4, top_k=2, r=2, init_weights=False)
    model = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(layout="shared_a", **cfg))
    stacked = get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(**cfg))
    a_shapes = {tuple(p.shape) for n, p in model.named_parameters() if "molora_A" in n}
    assert all(rows == 2 for rows, _ in a_shapes)  # one [r, d_in] per module
    saved = allocation_table(stacked).total_params - allocation_table(model).total_params
    want = sum(3 * 2 * m.in_features for m in model.modules() if hasattr(m, "molora_A"))  # (E - 1) r d_in
    assert saved == want
    assert "layout: shared_a" in str(allocation_table(model))
    model.train()
    ids = torch.randint(0, 64, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "molora_" in n)
    assert_save_load_same_logits(model, tiny_model("llama", num_layers=2), tmp_path / "a", ids)
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["layout"] == "shared_a" and conf["allocation"][0]["layout"] == "shared_a"
    conf["layout"] = "stacked"  # the same weights claimed for the other layout
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(AllocationError, match=r"adapter config edited after the adapter was saved: layout"):
        PeftModel.from_pretrained(tiny_model("llama", num_layers=2), tmp_path / "a")
    del conf["output_fingerprint"]  # an adapter saved before the fingerprint: the allocation check names the layer
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(AllocationError, match=r"layer 0: checkpoint 4 experts/top-2/r2, layout shared_a vs config "
                                              r"4 experts/top-2/r2"):
        PeftModel.from_pretrained(tiny_model("llama", num_layers=2), tmp_path / "a")
