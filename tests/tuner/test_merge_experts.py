"""Merging experts after training (issue 10): the plan and the weighted means against a direct computation,
exactness when the removed experts were never selected, save/load of the merged adapter, refusals, and the
`molora merge-experts` command reporting the accuracy change."""
from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

from conftest import assert_save_load_same_logits
from molora import MoLoRAConfig
from molora.tuner.merge import MergeError, expert_loads, merge_experts, plan_groups

from test_allocate import _batches
from test_train import _isolated_env, assets, write_recipe  # noqa: F401 (fixtures)


def _model(tiny_model, **kw):
    cfg = dict(num_experts=4, top_k=2, r=2, init_weights=False)
    cfg.update(kw)
    return get_peft_model(tiny_model("llama", num_layers=2), MoLoRAConfig(**cfg))


def test_plan_keeps_the_most_used_and_joins_the_rest_by_router_similarity():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert plan_groups(w, [0.4, 0.3, 0.2, 0.1], 2) == [[0, 2], [1, 3]]
    assert plan_groups(w, [0.1, 0.2, 0.3, 0.4], 2) == [[2, 0], [3, 1]]
    assert plan_groups(w, [0.25] * 4, 4) == [[0], [1], [2], [3]]


def test_merged_parameters_are_the_usage_weighted_means(tiny_model):
    model = _model(tiny_model)
    m = next(mod for mod in model.modules() if hasattr(mod, "molora_A") and mod.layer_index == 0)
    a, b, w = (t.detach().clone() for t in (m.molora_A["default"], m.molora_B["default"],
                                              m.molora_router["default"]))
    loads = {0: [0.5, 0.3, 0.2, 0.0], 1: [0.25] * 4}
    groups = plan_groups(w, loads[0], 2)
    report = merge_experts(model, 2, loads)
    assert [r.after for r in report] == [2, 2] and report[0].groups == groups
    r = 2
    for j, g in enumerate(groups):
        f = torch.tensor([loads[0][e] for e in g], dtype=torch.float64)
        f = f / f.sum()
        want_a = sum(fi * a[e * r:(e + 1) * r].double() for fi, e in zip(f, g, strict=True)).float()
        want_b = sum(fi * b[:, e * r:(e + 1) * r].double() for fi, e in zip(f, g, strict=True)).float()
        torch.testing.assert_close(m.molora_A["default"][j * r:(j + 1) * r], want_a)
        torch.testing.assert_close(m.molora_B["default"][:, j * r:(j + 1) * r], want_b)
        torch.testing.assert_close(m.molora_router["default"][j], w[g[0]])
    assert m.num_experts["default"] == 2 and m.top_k["default"] == 2
    cfg = model.peft_config["default"]
    assert cfg.num_experts == [2, 2] and [row["num_experts"] for row in cfg.allocation] == [2, 2]


def test_removing_experts_no_token_selected_is_exact_on_those_tokens(tiny_model):
    from test_layer import capture_inputs

    model = _model(tiny_model, num_experts=6, top_k=2)
    batches = _batches(pad=True)[:1]  # 30 tokens <= d_in = 32 (and 64 for down_proj)
    model.eval()
    n_modules = sum(1 for mod in model.modules() if hasattr(mod, "molora_router") and "default" in mod.molora_router)
    for i in range(n_modules):  # in call order: a module's new routing changes the inputs of the ones after it
        calls, hooks = capture_inputs(model)
        with torch.no_grad():
            model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
        for h in hooks:
            h.remove()
        mod, x = calls[i]  # router rows 4 and 5 with logit -50 on every one of its tokens: never selected
        x2 = x.reshape(-1, x.shape[-1]).double()
        v = torch.linalg.pinv(x2) @ torch.ones(x2.shape[0], dtype=torch.float64)
        mod.molora_router["default"].data[4:] = (-50.0 * v).float()
    model.eval()
    with torch.no_grad():
        want = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
    loads = expert_loads(model, batches)
    assert all(v[4] == 0 and v[5] == 0 for v in loads.values())
    report = merge_experts(model, 4, loads)
    assert all(r.exact and r.after == 4 for r in report)
    with torch.no_grad():
        for b, w_ in zip(batches, want, strict=True):
            got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            torch.testing.assert_close(got, w_, rtol=1e-5, atol=1e-5)


def test_exact_on_calibration_is_not_exact_on_held_out_tokens(tiny_model):
    """Issue 19.3: removed experts unused by the calibration tokens can be used by other tokens; the held-out
    measurement (loads and next-token log-probs on rows not used for calibration) says so with the true error,
    and agrees with a direct comparison of the logits."""
    from test_layer import capture_inputs

    from molora.tuner.merge import next_token_scores, output_change

    model = _model(tiny_model, num_experts=6, top_k=2)
    calib, held = _batches(pad=True)[:1], _batches(seed=7, pad=False)
    model.eval()
    n_modules = sum(1 for mod in model.modules() if hasattr(mod, "molora_router") and "default" in mod.molora_router)
    for i in range(n_modules):  # rows 4, 5: logit -50 on every calibration token, +50 along another direction
        calls, hooks = capture_inputs(model)
        with torch.no_grad():
            model(input_ids=calib[0]["input_ids"], attention_mask=calib[0]["attention_mask"])
        for h in hooks:
            h.remove()
        mod, x = calls[i]
        x2 = x.reshape(-1, x.shape[-1]).double()
        v = torch.linalg.pinv(x2) @ torch.ones(x2.shape[0], dtype=torch.float64)
        free = torch.randn(x2.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        free = free - torch.linalg.pinv(x2) @ (x2 @ free)  # orthogonal to every calibration input: no effect there
        mod.molora_router["default"].data[4:] = (-50.0 * v + 5.0 * free / free.norm()).float()
    with torch.no_grad():
        want_held = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in held]
    loads, held_loads = expert_loads(model, calib), expert_loads(model, held)
    assert all(v[4] == 0 and v[5] == 0 for v in loads.values())
    assert any(v[4] > 0 or v[5] > 0 for v in held_loads.values())  # other tokens do pick the removed experts
    before_calib, before_held = next_token_scores(model, calib), next_token_scores(model, held)
    report = merge_experts(model, 4, loads)
    assert all(r.exact for r in report)  # exact on the calibration tokens ...
    assert output_change(before_calib, next_token_scores(model, calib))["exact"]
    change = output_change(before_held, next_token_scores(model, held))  # ... but not on the held-out ones
    assert not change["exact"] and change["tokens"] == sum(int(b["attention_mask"][:, 1:].sum()) for b in held)
    with torch.no_grad():
        got_held = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in held]
    direct = max(float(torch.log_softmax(g[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None]).sub(
        torch.log_softmax(w_[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None])).abs().max())
        for g, w_, b in zip(got_held, want_held, held, strict=True))
    assert change["max_abs_logprob"] == pytest.approx(direct, rel=1e-4, abs=1e-6) and direct > 1e-3


def test_hash_adapters_are_not_merged(tiny_model):
    """Issue 19.3: a hash router sends id -> hash(id) mod E; fewer experts remap nearly every token, which the
    calibration loads cannot see (every expert is used), so the merge is refused naming the router."""
    model = _model(tiny_model, num_experts=4, top_k=1, router="hash")
    with pytest.raises(MergeError, match=r"router 'hash' routes each token id to expert hash\(id\) mod E"):
        merge_experts(model, 2, expert_loads(model, _batches()))


def test_lossy_merge_saves_loads_and_is_reported(tiny_model, tmp_path):
    model = _model(tiny_model)
    batches = _batches()
    loads = expert_loads(model, batches)
    report = merge_experts(model, 1, loads)
    assert all(r.after == 1 and not r.exact for r in report)  # every used expert folded into one: an approximation
    ids = torch.randint(0, 64, (2, 7))
    assert_save_load_same_logits(model, tiny_model("llama", num_layers=2), tmp_path / "m", ids)
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["num_experts"] == [1, 1]


def test_merge_refusals_name_the_value(tiny_model):
    with pytest.raises(MergeError, match="max_experts=0 must be an int >= 1"):
        merge_experts(_model(tiny_model), 0, {})
    with pytest.raises(MergeError, match=r"no usage recorded for layer\(s\) \[0, 1\]"):
        merge_experts(_model(tiny_model), 2, {})
    split = _model(tiny_model, num_experts_mlp=3)
    with pytest.raises(MergeError, match="split attention and MLP"):
        merge_experts(split, 2, expert_loads(split, _batches()))


def test_merge_experts_command_reports_the_accuracy_change(assets, tmp_path, capsys):
    from molora.run.cli import main as cli
    from molora.run.train import main as train

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, allocation={"num_experts": 4, "top_k": 2},
                          train={"max_steps": 2}, eval={"before": False, "after": False})
    assert train([str(recipe)]) == 0
    capsys.readouterr()
    assert cli(["merge-experts", str(recipe), "--adapter", str(out / "adapter"), "--max-experts", "2",
                "--calib-examples", "8"]) == 0
    text = capsys.readouterr().out
    assert "4 -> 2" in text and "loglik accuracy on" in text and "->" in text
    merged = out / "adapter-merged2"
    rep = json.loads((merged / "merge_report.json").read_text())
    assert rep["max_experts"] == 2 and all(layer["after"] == 2 for layer in rep["layers"])
    # measured on 8 other training rows: their tokens, the true change, a verdict that matches it
    assert rep["heldout_rows"] == 8 and rep["heldout_change"]["tokens"] > 0
    assert rep["exact"] is False and rep["heldout_change"]["max_abs_logprob"] > 1e-4
    assert f"lossy on {rep['heldout_change']['tokens']} held-out tokens" in text
    assert "accuracy" in rep["accuracy_after"]["loglik"]
    assert cli(["eval", str(recipe), "--adapter", str(merged)]) == 0  # the merged adapter is a normal adapter
    assert cli(["merge-experts", str(recipe), "--adapter", str(out / "adapter"), "--max-experts", "0"]) == 2
    assert "--max-experts=0 must be >= 1" in capsys.readouterr().err


def test_merge_experts_refuses_an_out_that_would_destroy_the_source_before_any_work(assets, tmp_path, capsys):
    """Issue 19.8: --out equal to --adapter overwrote the source (and left a stale completion marker); --out naming a
    file failed only after all the work. Both are refused up front, with nothing loaded or written."""
    import time

    from molora.run.cli import main as cli

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for out, match in [(adapter, "is the source adapter"), (tmp_path / "." / "adapter", "is the source adapter"),
                       (a_file, "is a file, not a folder"), (a_file / "sub", "is a file, not a folder"),
                       (adapter / "merged", "inside the source adapter")]:
        t0 = time.perf_counter()
        assert cli(["merge-experts", str(recipe), "--adapter", str(adapter), "--max-experts", "1",
                    "--out", str(out)]) == 2
        assert match in capsys.readouterr().err and time.perf_counter() - t0 < 5
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json"]
