"""Attention and MLP projections of one layer with their own expert counts (issue 9, ``attn-mlp``): the signal
against a direct computation, the mapping of the two series, injection (counts, aux-loss groups, gradients),
save/load, and ``auto:attn-mlp`` end to end."""
from __future__ import annotations

import copy
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from molora import AllocationError, MoLoRAConfig, MoLoRALinear, allocation_table
from molora.allocation.mapping import MappingError, scores_to_experts
from molora.tuner.injection import module_kind

from test_allocate import _batches, _cli
from test_layer import batch, capture_inputs, causal_lm_loss
from test_train import _isolated_env, _records, assets, write_recipe  # noqa: F401 (fixtures)


@pytest.mark.parametrize("rest,kind", [
    ("self_attn.q_proj", "attn"), ("mlp.down_proj", "mlp"), ("attn.c_attn", "attn"), ("mlp.c_fc", "mlp"),
    ("attention.self.query", "attn"), ("attention.output.dense", "attn"), ("intermediate.dense", "mlp"),
    ("output.dense", "mlp"), ("attention.query_key_value", "attn"), ("block_sparse_moe.gate", "mlp"),
    ("fc1", None), ("q_proj", None),
])
def test_module_kind_reads_the_sub_block_from_the_name(rest, kind):
    assert module_kind(rest) == kind


# ------------------------------------------------------------------------------------------ the signal
class _Zero(nn.Module):
    """Stands in for a sub-block: returns zeros shaped like its input (and the attention tuple when asked)."""

    def __init__(self, tuple_out: bool):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        z = torch.zeros_like(x)
        return (z, None) if self.tuple_out else z


def _hidden(model, batches, final_norm):
    model = copy.deepcopy(model)
    setattr(final_norm[0](model), final_norm[1], nn.Identity())
    with torch.no_grad():
        return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      output_hidden_states=True).hidden_states for b in batches]


def _cos_mean(xs, ys, batches):
    s = n = 0.0
    for x, y, b in zip(xs, ys, batches, strict=True):
        x, y, m = x.double().numpy(), y.double().numpy(), b["attention_mask"].double().numpy()
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        s += (cos * m).sum()
        n += m.sum()
    return s / n


ARCHS = {
    # blocks, attention / MLP child names, final norm, attention returns a tuple
    "llama": (lambda m: m.model.layers, "self_attn", "mlp", (lambda m: m.model, "norm")),
    "gpt2": (lambda m: m.transformer.h, "attn", "mlp", (lambda m: m.transformer, "ln_f")),
}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox-parallel"])
def test_attn_mlp_equals_the_direct_computation(tiny_model, arch):
    """Direct: block l's h_mid is the output of a copy whose block-l MLP returns zeros (earlier blocks unchanged);
    for a parallel block the MLP's own output is that of a copy whose attention returns zeros."""
    from molora.allocation.signals import attn_mlp

    if arch == "neox-parallel":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, use_parallel_residual=True, hidden_dropout=0.0,
            attention_dropout=0.0)).eval()
        blocks_of, att_name, mlp_name, norm = (lambda m: m.gpt_neox.layers, "attention", "mlp",
                                               (lambda m: m.gpt_neox, "final_layer_norm"))
    else:
        model = tiny_model(arch, num_layers=4)
        blocks_of, att_name, mlp_name, norm = ARCHS[arch]
    batches = _batches()
    got = attn_mlp(model, batches)
    n = len(blocks_of(model))
    hs = _hidden(model, batches, norm)
    want_attn, want_mlp = [], []
    for layer in range(n):
        no_mlp = copy.deepcopy(model)
        setattr(blocks_of(no_mlp)[layer], mlp_name, _Zero(tuple_out=False))
        mid = _hidden(no_mlp, batches, norm)
        h_in = [h[layer] for h in hs]
        h_mid = [h[layer + 1] for h in mid]
        h_out = [h[layer + 1] for h in hs]
        want_attn.append(1 - _cos_mean(h_in, h_mid, batches))
        if arch == "neox-parallel":
            no_attn = copy.deepcopy(model)
            setattr(blocks_of(no_attn)[layer], att_name, _Zero(tuple_out=True))
            only_mlp = [h[layer + 1] for h in _hidden(no_attn, batches, norm)]
            want_mlp.append(1 - _cos_mean(h_in, only_mlp, batches))
        else:
            want_mlp.append(1 - _cos_mean(h_mid, h_out, batches))
    np.testing.assert_allclose(got.scores, want_attn, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.scores_mlp, want_mlp, rtol=1e-4, atol=1e-6)
    assert got.detail["parallel"] == (arch == "neox-parallel")
    assert got.detail["tokens"] == int(sum(b["attention_mask"].sum() for b in batches))


def test_attn_mlp_refuses_blocks_it_cannot_measure(tiny_model):
    from molora.allocation.signals import attn_mlp

    with pytest.raises(ValueError, match=r"attn-mlp: block 0 \(BertLayer\) is not a residual block"):
        attn_mlp(tiny_model("bert", num_layers=2), _batches())


# ------------------------------------------------------------------------------------------ mapping
def test_two_series_share_one_budget_and_group_inside_each():
    attn, mlp = [0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4]
    got = scores_to_experts(attn + mlp, 2 * 10, segments=[4, 4])
    assert got == [1, 1, 2, 2, 3, 3, 4, 4]  # one water level over both series: E ∝ score
    grouped = scores_to_experts([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], 21, groups=1, segments=[3, 6])
    assert grouped == [1] * 3 + [3] * 6  # one group per series: shares 0.93 and 3.03 per layer
    with pytest.raises(MappingError, match="segments=.* must be positive and sum to the 8 scores"):
        scores_to_experts(attn + mlp, 20, segments=[4, 3])
    with pytest.raises(MappingError, match=r"groups=4 must be an int between 1 and the number of layers \(3\)"):
        scores_to_experts([1.0] * 6, 12, groups=4, segments=[3, 3])


# ------------------------------------------------------------------------------------------ injection
def _split_model(tiny_model, coef=0.5, **kw):
    base = tiny_model("llama", num_layers=4)
    cfg = dict(num_experts=[2, 3, 2, 4], num_experts_mlp=[4, 2, 3, 2], top_k=2, r=2, lora_alpha=4,
               aux_loss_coef=coef, init_weights=False)
    cfg.update(kw)
    model = get_peft_model(base, MoLoRAConfig(**cfg))
    model.train()
    return model


def test_attention_and_mlp_projections_get_their_own_counts(tiny_model):
    model = _split_model(tiny_model)
    for m in model.modules():
        if isinstance(m, MoLoRALinear):
            kind = "mlp" if ".mlp." in m.module_name else "attn"
            want = ([4, 2, 3, 2] if kind == "mlp" else [2, 3, 2, 4])[m.layer_index]
            assert m.num_experts["default"] == want, m.module_name
            assert m.router_group["default"] == f"{m.layer_index}.{kind}"
    table = allocation_table(model)
    assert [r.key for r in table][:4] == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    assert [(r.num_experts, r.modules) for r in table][:2] == [(2, 4), (4, 3)]
    assert "0.mlp" in str(table)
    cfg = model.peft_config["default"]
    assert cfg.allocation[0] == {"layer": 0, "num_experts": 2, "top_k": 2, "r": 2, "num_experts_mlp": 4}


def _direct_aux_by_group(calls, token_mask, adapter="default"):
    """The MoLA aux loss with each (layer, kind) its own group: concatenated router logits per group; a group with
    E <= k (every token takes every expert) has nothing to balance and is left out."""
    groups = defaultdict(list)
    for mod, x in calls:
        groups[mod.router_group[adapter]].append((mod, x))
    total = torch.zeros(())
    for _, items in sorted(groups.items()):
        mod0 = items[0][0]
        E, k = mod0.num_experts[adapter], mod0.top_k[adapter]
        if E <= k:
            continue
        logits = torch.cat([x.reshape(-1, x.shape[-1]) @ mod.molora_router[adapter].t() for mod, x in items])
        logits = logits[token_mask.reshape(-1).bool().repeat(len(items))]
        probs = torch.softmax(logits.float(), dim=-1)
        idx = torch.topk(probs, k, dim=-1).indices
        f = F.one_hot(idx, E).sum((0, 1)).float() / (k * probs.shape[0])
        total = total + E * (f.detach() * probs.mean(0)).sum()
    return total


def test_aux_loss_and_its_gradient_are_grouped_per_layer_and_kind(tiny_model):
    coef = 0.5
    model = _split_model(tiny_model, coef=coef)
    ref = _split_model(tiny_model, coef=0.0)
    ref.load_state_dict(model.state_dict())
    ids, mask, labels = batch()

    calls, hooks = capture_inputs(ref)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    for h in hooks:
        h.remove()
    aux = _direct_aux_by_group(calls, mask)
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    want = torch.autograd.grad(out_ref.loss + coef * aux, list(params.values()))

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out["aux_loss"], aux.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels) + coef * aux.detach(), rtol=1e-5,
                               atol=1e-6)
    out.loss.backward()
    got = dict(model.named_parameters())
    for (name, _), w in zip(params.items(), want, strict=True):
        torch.testing.assert_close(got[name].grad, w, rtol=1e-4, atol=1e-6, msg=name)
    summary = model.base_model.router_summary()
    assert set(summary) == {f"{i}.{k}" for i in range(4) for k in ("attn", "mlp")}
    assert summary["0.mlp"]["num_experts"] == 4 and len(summary["0.mlp"]["load"]) == 4


def test_split_adapter_saves_loads_and_refuses_another_split(tiny_model, tmp_path):
    model = _split_model(tiny_model)
    ids, mask, _ = batch()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["num_experts_mlp"] == [4, 2, 3, 2]
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_layers=4), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want)
    # the same adapter config, but the MLP counts edited: refused naming the layer
    saved["num_experts_mlp"] = [2, 2, 3, 2]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(AllocationError, match=r"adapter config edited after the adapter was saved: num_experts_mlp"):
        PeftModel.from_pretrained(tiny_model("llama", num_layers=4), tmp_path / "a")
    del saved["output_fingerprint"]  # an adapter saved before the fingerprint: the allocation check names the layer
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(AllocationError, match=r"layer 0: checkpoint 2 \(MLP 4\) experts/top-2/r2 vs config "
                                              r"2 \(MLP 2\) experts/top-2/r2"):
        PeftModel.from_pretrained(tiny_model("llama", num_layers=4), tmp_path / "a")


@pytest.mark.parametrize("kw,match", [
    (dict(num_experts_mlp=[4, 1, 3, 2]), r"top_k=2 is larger than num_experts_mlp=1 in layer 1"),
    (dict(num_experts_mlp="auto:attn-mlp"), "data-driven allocations .* are for num_experts only"),
    (dict(num_experts="auto:attn-mlp", expert_budget=8), "an auto: allocation sets the counts itself"),
])
def test_split_allocation_errors_name_the_value(tiny_model, kw, match):
    with pytest.raises(AllocationError, match=match):
        _split_model(tiny_model, **kw)


def test_split_refuses_a_target_that_is_neither_attention_nor_mlp(tiny_model):
    base = tiny_model("llama", num_layers=4)
    base.model.layers[2].gate = nn.Linear(32, 32)  # a linear directly on the block: no sub-block in its name
    cfg = MoLoRAConfig(num_experts=2, num_experts_mlp=3, top_k=1, target_modules=["q_proj", "gate"])
    with pytest.raises(AllocationError, match=r"1 target module\(s\) are in neither an attention nor an MLP "
                                              r"sub-block by name, e.g. \['model.layers.2.gate'\]"):
        get_peft_model(base, cfg)


def test_split_without_numbered_layers_is_refused():
    from molora.allocation.specs import resolve_allocation

    with pytest.raises(AllocationError, match="num_experts_mlp=2 is per layer"):
        resolve_allocation(2, 1, 4, None, num_experts_mlp=2)
    # with a budget both kinds are scaled to it: attention and MLP hold 2 x budget together
    alloc = resolve_allocation("uniform", 1, 4, 8, expert_budget=16, num_experts_mlp="inverted_triangle")
    assert sum(a.num_experts for a in alloc) == 16 and sum(a.num_experts_mlp for a in alloc) == 16


# ------------------------------------------------------------------------------------------ end to end
def test_allocate_attn_mlp_and_auto_attn_mlp_in_a_recipe(assets, tmp_path, capsys, monkeypatch):
    from molora.run.recipe import load_recipe
    from molora.run.train import main

    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", allocation={"top_k": 1})
    frag = tmp_path / "alloc.yaml"
    rc = _cli(["allocate", recipe, "--method", "attn-mlp", "--budget", "10", "--calib-examples", "8",
               "--write", frag, "--out", tmp_path / "alloc"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "attn score" in out and "MLP experts" in out
    data = json.loads((tmp_path / "alloc" / "attn-mlp-budget10.json").read_text())
    assert sum(data["experts"]) + sum(data["experts_mlp"]) == 20 and len(data["scores_mlp"]) == 4
    import yaml

    fragment = yaml.safe_load(frag.read_text())["allocation"]
    assert fragment == {"num_experts": data["experts"], "num_experts_mlp": data["experts_mlp"]}
    merged = yaml.safe_load(recipe.read_text())
    merged["allocation"].update(fragment)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(merged))
    assert load_recipe(tmp_path / "m.yaml").allocation.num_experts_mlp == data["experts_mlp"]

    monkeypatch.setenv("MOLORA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "auto"
    recipe = write_recipe(tmp_path / "a.yaml", assets, run, train={"max_steps": 2, "logging_steps": 1},
                          allocation={"num_experts": "auto:attn-mlp", "expert_budget": 10, "top_k": 1,
                                      "auto_calib_examples": 8},
                          eval={"before": False, "after": False})
    assert main([str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "auto:attn-mlp with budget 10" in printed and "MLP [" in printed
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert [row["num_experts_mlp"] for row in cfg["allocation"]] == cfg["num_experts_mlp"]
    assert sum(cfg["num_experts"]) + sum(cfg["num_experts_mlp"]) == 20
    # the same rows and settings as `molora allocate` above: the same allocation, and its parameter count is the
    # trained adapter's (MLP projections counted with their own experts)
    assert cfg["num_experts"] == data["experts"] and cfg["num_experts_mlp"] == data["experts_mlp"]
    assert sum(data["params"]) == _records(run, "run")[0]["trainable_params"]
    router = [r for r in _records(run, "train") if r.get("router")][-1]["router"]
    assert "0.attn" in router["layers"] and "0.mlp" in router["layers"]
    assert _cli(["report", run]) == 0
    assert (run / "plots" / "expert_load.png").is_file()
