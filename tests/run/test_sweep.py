"""`molora sweep` (issue 9): plan and bad input, a sweep killed mid-cell resumes to the same table as an
uninterrupted one, extra evaluation files, the merged report with intervals and paired comparisons."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from molora.run.sweep import (SweepError, parse_arm, parse_cells_spec, parse_search, plan_cells, plan_search_cells,
                              summary_markdown)

from molora.run.recipe import load_recipe, parse_overrides
from test_train import _isolated_env, assets, write_recipe  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]


def _sweep(argv, env_extra=None, capsys=None):
    from molora.run.sweep import main

    saved = dict(os.environ)
    os.environ.update(env_extra or {})
    try:
        return main([str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_plan_and_cells_spec():
    cells = plan_cells(["▽", "uniform", "2468", "2|4|6|8", "auto:block-influence", "lora"][:3] + ["lora"], [0, 1])
    assert [c.name for c in cells] == ["inverted_triangle-seed0", "inverted_triangle-seed1", "uniform-seed0",
                                       "uniform-seed1", "blocks-2468-seed0", "blocks-2468-seed1", "lora-seed0",
                                       "lora-seed1"]
    assert parse_cells_spec("2/3") == (2, 3) and parse_cells_spec(None) == (1, 1)
    for bad in ("0/2", "3/2", "a/b", "2"):
        with pytest.raises(SweepError, match="--cells"):
            parse_cells_spec(bad)
    with pytest.raises(SweepError, match="unknown allocation 'pyramid'"):
        plan_cells(["▽", "pyramid"], [0])
    with pytest.raises(SweepError, match="unknown allocation method 'nope'"):
        plan_cells(["auto:nope"], [0])
    with pytest.raises(SweepError, match="repeats inverted_triangle"):
        plan_cells(["▽", "inverted_triangle"], [0])


@pytest.mark.parametrize("argv,match", [
    (["--allocations", "▽,pyramid"], "unknown allocation 'pyramid'"),
    (["--allocations", "▽,lora", "--cells", "3/2"], "--cells '3/2': i must be between 1 and N"),
    (["--allocations", "▽,lora", "--cells", "1/9"], "N=9 is more than the 2 cells"),
    (["--allocations", "▽", "--seeds", "a"], "--seeds 'a'"),
    (["--allocations", "▽", "--eval-file", "/nonexistent.jsonl"], "no such file"),
    (["--allocations", " "], "--allocations is empty"),
    (["--allocations", "▽,lora", "--compare", "□"], "--compare '□' is not an arm of this sweep; allowed: ▽, lora"),
    (["--allocations", "▽,lora", "--compare", "lora,"], "--compare 'lora,': an empty arm"),
])
def test_bad_input_fails_before_any_training(assets, tmp_path, capsys, argv, match):
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run")
    assert _sweep([recipe, *argv]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run" / "sweep" / "plan.json").exists()


def test_sweep_killed_mid_cell_resumes_to_the_same_table(assets, tmp_path, capsys):
    common = dict(train={"max_steps": 2, "save_steps": 1, "logging_steps": 1},
                  eval={"before": False, "loglik_max_examples": 8, "generation": False},
                  report={"wandb": False, "plots": False})
    args = ["--allocations", "▽,lora", "--seeds", "0,1", "--eval-file", assets["validation"]]
    full = write_recipe(tmp_path / "full.yaml", assets, tmp_path / "full", **common)
    assert _sweep([full, *args]) == 0
    part = write_recipe(tmp_path / "part.yaml", assets, tmp_path / "part", **common)
    # every cell dies right after its first checkpoint (as if killed), the sweep reports it and exits 1
    from molora_faults import CRASH, child_env

    assert _sweep([part, *args], env_extra=child_env(**{CRASH: "1"})) == 1
    err = capsys.readouterr().err
    assert "4 cell(s) failed" in err
    sweep_dir = tmp_path / "part" / "sweep"
    assert (sweep_dir / "lora-seed1" / "checkpoint-1").is_dir()
    assert not (sweep_dir / "lora-seed1" / "results.json").exists()
    # the same command again resumes every cell from its checkpoint
    assert _sweep([part, *args]) == 0
    out = capsys.readouterr().out
    assert out.count(": resumed (") == 4
    a = json.loads((tmp_path / "full" / "sweep" / "summary.json").read_text())
    b = json.loads((sweep_dir / "summary.json").read_text())
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "train seconds"} for r in rows]  # noqa: E731
    assert untimed(a["rows"]) == untimed(b["rows"]) and a["paired"] == b["paired"]
    assert b["cells_done"] == 4 and {"val loglik accuracy", "val loglik accuracy_norm", "validation loglik accuracy",
                                     "validation loglik accuracy_norm"} <= set(b["metrics"])
    lora = next(r for r in b["rows"] if r["allocation"] == "lora")
    tri = next(r for r in b["rows"] if r["allocation"] == "inverted_triangle")
    assert abs(lora["trainable params"]["mean"] - tri["trainable params"]["mean"]) / tri["trainable params"]["mean"] \
        < 0.1, "LoRA's rank matches the mixtures' trainable parameters"
    assert (sweep_dir / "summary.png").stat().st_size > 1000
    md = (sweep_dir / "summary.md").read_text()
    assert "Paired vs inverted_triangle" in md and "paired over 8 questions × 2 seeds" in md
    assert (sweep_dir / "lora-seed0" / "predictions_after.json").is_file()
    # a third run skips everything; --report alone re-merges
    assert _sweep([part, *args]) == 0
    assert capsys.readouterr().out.count("skipped (finished)") == 4
    assert _sweep([part, *args, "--report"]) == 0


def test_summary_statistics():
    """mean, sample std and the 95 % t half-width over seeds; paired differences."""
    from molora.run.paired_stats import t_interval

    mean, sd, half = t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.1) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    text = summary_markdown({"cells_done": 1, "cells_planned": 2, "metrics": ["val loglik accuracy"], "paired": {},
                             "rows": [{"allocation": "lora", "seeds": [0], "val loglik accuracy": {
                                 "mean": 0.5, "std": float("nan"), "ci95": float("nan"), "n": 1, "values": [0.5]}}]})
    assert "| lora | 1 | 0.500 (n=1) | - | - |" in text


def test_arms_and_search_grid_parse_and_refuse_bad_input():
    arm = parse_arm("▽@allocation.router_init=zeros@train.router_lr_multiplier=10")
    assert arm.allocation == "▽" and arm.overrides == (("allocation.router_init", "zeros"),
                                                        ("train.router_lr_multiplier", "10"))
    assert arm.slug == "inverted_triangle-router_initzeros-router_lr_multiplier10"
    assert parse_arm("lora-active").slug == "lora-active" and parse_arm("base").slug == "base"
    grid = parse_search(["train.learning_rate=1e-4,3e-4", "allocation.top_k=1,2"])
    assert grid == [{"train.learning_rate": "1e-4", "allocation.top_k": "1"},
                    {"train.learning_rate": "1e-4", "allocation.top_k": "2"},
                    {"train.learning_rate": "3e-4", "allocation.top_k": "1"},
                    {"train.learning_rate": "3e-4", "allocation.top_k": "2"}]
    cells = plan_search_cells(["▽", "lora", "base"], grid, [0])
    assert len(cells) == 8 and cells[0].folder == "search/inverted_triangle-g0-seed0"
    assert cells[1].extra == ("--train.learning_rate", "1e-4", "--allocation.top_k", "2")
    final = plan_cells(["▽", "base"], [0, 1], {"inverted_triangle": {"train.learning_rate": "3e-4"}})
    assert [c.name for c in final] == ["inverted_triangle-seed0", "inverted_triangle-seed1", "base"]
    assert final[0].extra == ("--train.learning_rate", "3e-4") and final[2].seed is None
    for bad, match in [("▽@lr=1", "not a recipe key"), ("▽@train.learning_rate", "not section.key=value"),
                       ("base@train.seed=1", "takes no overrides")]:
        with pytest.raises(SweepError, match=match):
            parse_arm(bad)
    for bad, match in [(["train.learning_rate="], "has no value"), (["train.seed=1,2"], "set by the sweep"),
                       (["train.learning_rate=1,1"], "a value repeats"),
                       (["train.learning_rate=1", "train.learning_rate=2"], "given twice")]:
        with pytest.raises(SweepError, match=match):
            parse_search(bad)


def test_grid_edges_flag_a_choice_on_the_smallest_or_largest_value_of_each_numeric_axis():
    from molora.run.sweep_plan import grid_edges
    from molora.run.sweep_report import edge_note

    grid = parse_search(["train.learning_rate=5e-4,1e-3,2e-3,2.5e-4", "allocation.router=topk,soft"])
    lr = {p["train.learning_rate"] for p in grid}
    assert len(grid) == 8 and lr == {"5e-4", "1e-3", "2e-3", "2.5e-4"}
    at = {(p["train.learning_rate"], p["allocation.router"]): i for i, p in enumerate(grid)}
    # listed order is not numeric order: 2.5e-4 (listed last) is the smallest, 2e-3 the largest
    assert grid_edges(grid, at[("2.5e-4", "soft")]) == [("train.learning_rate", "2.5e-4", "smallest")]
    assert grid_edges(grid, at[("2e-3", "topk")]) == [("train.learning_rate", "2e-3", "largest")]
    assert grid_edges(grid, at[("1e-3", "topk")]) == [] and grid_edges(grid, at[("5e-4", "soft")]) == []
    two = parse_search(["train.learning_rate=1e-3", "train.max_steps=100,200"])  # one-value axis: never an edge
    assert grid_edges(two, 0) == [("train.max_steps", "100", "smallest")]
    assert edge_note({"at_edge": []}) == ""
    note = edge_note({"at_edge": [{"key": "train.learning_rate", "value": "2e-3", "edge": "largest"}]})
    assert "train.learning_rate 2e-3 is the largest searched" in note and "widen" in note


def test_search_selects_on_validation_then_reruns_the_choice_over_seeds(assets, tmp_path, capsys):
    """Every arm gets the same grid; the selection is the best validation score; the final cells train the selected
    setting over the seeds and are scored on held-out data; the untuned model is a row; matched LoRAs both ways."""
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run",
                          train={"max_steps": 2, "save_steps": 2, "logging_steps": 1},
                          eval={"before": False, "loglik_max_examples": 8, "generation": False},
                          report={"wandb": False, "plots": False})
    args = ["--allocations", "▽,lora,lora-active,base", "--seeds", "0,1", "--search", "train.learning_rate=1e-6,0.05",
            "--eval-file", assets["validation"]]
    assert _sweep([recipe, *args]) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "run" / "sweep"
    sel = json.loads((sweep_dir / "search.json").read_text())
    assert sel["primary"] == "val loglik accuracy" and set(sel["arms"]) == {"inverted_triangle", "lora", "lora-active"}
    from molora.run.sweep_report import cell_metrics

    for slug, s in sel["arms"].items():
        scores = [cell_metrics(sweep_dir / "search" / f"{slug}-g{g}-seed0")["val loglik accuracy"] for g in (0, 1)]
        assert s["scores"] == scores
        best = max(range(2), key=lambda g: (scores[g], -g))
        assert s["selected"] == best and s["setting"] == sel["grid"][best]
        edge = "smallest" if best == 0 else "largest"  # a grid of two: every choice is on its edge, and said so
        assert s["at_edge"] == [{"key": "train.learning_rate", "value": s["setting"]["train.learning_rate"],
                                 "edge": edge}]
        lr = float(s["setting"]["train.learning_rate"])
        run = json.loads((sweep_dir / f"{slug}-seed1" / "metrics.jsonl").read_text().splitlines()[0])
        assert run["recipe"]["train"]["learning_rate"] == pytest.approx(lr), "final cells train the selection"
    assert "selected for inverted_triangle on validation" in out and "on the grid's edge" in out
    assert out.count("reused ") == 3, "seed 0 of every arm is its selected search cell"
    for slug, s in sel["arms"].items():
        a = (sweep_dir / f"{slug}-seed0" / "adapter" / "adapter_model.safetensors").read_bytes()
        assert a == (sweep_dir / "search" / f"{slug}-g{s['selected']}-seed0" / "adapter" /
                     "adapter_model.safetensors").read_bytes()
        assert (sweep_dir / f"{slug}-seed0" / "eval-validation.json").is_file()
    summary = json.loads((sweep_dir / "summary.json").read_text())
    rows = {r["allocation"]: r for r in summary["rows"]}
    assert rows["base"]["untuned"] and rows["base"]["seeds"] == []
    assert rows["lora-active"]["trainable params"]["mean"] < rows["lora"]["trainable params"]["mean"]
    assert rows["lora-active"]["active rank"]["mean"] == rows["inverted_triangle"]["active rank"]["mean"] == 4
    assert rows["lora"]["active rank"]["mean"] > 4  # matched parameters: a wider rank than any token uses
    tri = rows["inverted_triangle"]
    assert 0 < tri["router entropy"]["mean"] <= 1 and 0 <= tri["near-uniform layers"]["mean"] <= 1
    assert -1 <= tri["expert cosine"]["mean"] <= 1 and "router entropy" not in rows["lora"]
    assert not (sweep_dir / "search" / "lora-g0-seed0" / "eval-validation.json").exists(), "held-out: final only"
    vs_base = {(i["allocation"], i["metric"]): i for i in summary["paired"]["vs base"]}
    item = vs_base[("lora", "validation loglik accuracy")]
    assert item["bootstrap"]["n_seeds"] == 2 and item["bootstrap"]["n_questions"] == 8
    assert item["diff_mean"] == pytest.approx(rows["lora"]["validation loglik accuracy"]["mean"]
                                              - rows["base"]["validation loglik accuracy"]["mean"])
    md = (sweep_dir / "summary.md").read_text()
    assert "base (untuned)" in md and "Settings selected on validation" in md and "resolvable ≥" in md
    assert "is the largest searched" in md or "is the smallest searched" in md


def test_paired_bootstrap_matches_the_paired_difference_and_its_standard_error():
    import random

    from molora.run.paired_stats import MDE_FACTOR, paired_bootstrap

    rng = random.Random(0)
    q = 400
    b = {0: {str(i): rng.random() < 0.5 for i in range(q)}}
    a = {0: {k: (v if rng.random() < 0.8 else not v) or rng.random() < 0.1 for k, v in b[0].items()}}
    d = [int(a[0][k]) - int(b[0][k]) for k in b[0]]
    mean = sum(d) / q
    se = (sum((x - mean) ** 2 for x in d) / (q - 1) / q) ** 0.5
    r = paired_bootstrap(a, b, n_boot=8000)
    assert r["diff"] == pytest.approx(mean) and r["n_questions"] == q and r["n_seeds"] == 1
    assert r["se"] == pytest.approx(se, rel=0.08)
    assert r["lo"] < mean < r["hi"] and r["mde"] == pytest.approx(MDE_FACTOR * r["se"])
    assert r["wins"] == sum(x > 0 for x in d) and r["losses"] == sum(x < 0 for x in d)
    # a seed-independent reference pairs with every seed; identical arms differ by exactly 0
    same = paired_bootstrap({0: b[0], 1: b[0]}, {None: b[0]})
    assert same["diff"] == 0 and same["lo"] == same["hi"] == 0 and same["n_seeds"] == 2 and same["p"] == 1.0
    assert paired_bootstrap(a, {5: b[0]}) is None


def test_an_edited_recipe_is_refused_naming_the_keys_or_started_over(assets, tmp_path, capsys):
    """Issue 19.4: finished cells record their effective settings; a re-run with an edited recipe is refused before
    any work, naming what changed; --restart-changed trains those cells again."""
    common = dict(train={"max_steps": 2, "save_steps": 2, "logging_steps": 1},
                  eval={"before": False, "loglik_max_examples": 4, "generation": False},
                  report={"wandb": False, "plots": False})
    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", **common)
    args = ["--allocations", "▽", "--seeds", "0"]
    assert _sweep([recipe, *args]) == 0
    cell = tmp_path / "run" / "sweep" / "inverted_triangle-seed0"
    rec = json.loads((cell / "cell.json").read_text())["settings"]
    assert rec["train.learning_rate"] == 0.01 and rec["train.seed"] == 0 and "train.output_dir" not in rec
    before = (cell / "results.json").read_bytes()
    capsys.readouterr()
    edited = dict(common, train={**common["train"], "learning_rate": 0.02})
    write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", **edited)
    assert _sweep([recipe, *args]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: 0.01 there, 0.02 now" in err and "--restart-changed" in err
    assert (cell / "results.json").read_bytes() == before, "nothing was touched"
    # an override is a change too
    write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", **common)
    assert _sweep([recipe, *args, "--allocation.lora_dropout", "0.1"]) == 2
    assert "allocation.lora_dropout: 0.0 there, 0.1 now" in capsys.readouterr().err
    # how a cell is run (threads, save and log cadence) is not what it computes: the finished cell is reused,
    # also against a record that still lists those keys (cells recorded before they were left out)
    rec_path = cell / "cell.json"
    rec_path.write_text(json.dumps({"settings": {**rec, "train.save_steps": 50, "train.threads": None}}))
    assert _sweep([recipe, *args, "--train.threads", "1", "--train.save_steps", "1", "--train.logging_steps", "2"]) == 0
    assert (cell / "results.json").read_bytes() == before, "a finished cell is reused"
    # a key a newer molora added, at its default, is how the cell ran (a field's default keeps the old behaviour):
    # cells recorded before `allocation.share_sibling_shrink` / `modules_to_save` existed are reused, while a
    # new key set away from its default is a change
    old_rec = {k: v for k, v in rec.items()
               if k not in ("allocation.share_sibling_shrink", "allocation.modules_to_save")}
    assert len(old_rec) == len(rec) - 2
    rec_path.write_text(json.dumps({"settings": old_rec}))
    capsys.readouterr()
    assert _sweep([recipe, *args]) == 0, capsys.readouterr().err
    assert (cell / "results.json").read_bytes() == before, "a finished cell is reused"
    assert json.loads(rec_path.read_text())["settings"] == rec, "the reused cell's record names the new keys"
    assert _sweep([recipe, *args, "--allocation.share_sibling_shrink", "false"]) == 2
    assert "allocation.share_sibling_shrink: True there, False now" in capsys.readouterr().err
    rec_path.write_text(json.dumps({"settings": rec}))
    capsys.readouterr()
    write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", **edited)
    assert _sweep([recipe, *args, "--restart-changed"]) == 0
    assert "started over (train.learning_rate changed)" in capsys.readouterr().out
    assert json.loads((cell / "cell.json").read_text())["settings"]["train.learning_rate"] == 0.02
    run = json.loads((cell / "metrics.jsonl").read_text().splitlines()[0])
    assert run["recipe"]["train"]["learning_rate"] == 0.02
    # issue 19.10: a garbage plan.json or a cell's results.json is one line naming the file, not a traceback and
    # not a cell silently missing from the table
    capsys.readouterr()
    plan = tmp_path / "run" / "sweep" / "plan.json"
    plan_text = plan.read_text()
    for garbage in ("{not json", "[1, 2]"):
        plan.write_text(garbage)
        assert _sweep([recipe, *args]) == 2
        err = capsys.readouterr().err
        assert f"{plan} is unreadable" in err and "Traceback" not in err, err
    plan.write_text(plan_text)
    (cell / "results.json").write_text('{"accuracy": ')
    assert _sweep([recipe, *args]) == 2
    err = capsys.readouterr().err
    assert f"{cell / 'results.json'} is unreadable (not JSON" in err and "delete it" in err, err
    assert _sweep([recipe, *args, "--report"]) == 2
    assert f"{cell / 'results.json'} is unreadable" in capsys.readouterr().err


def _fake_cell(folder: Path, correct: list[int], val: float) -> None:
    """A finished final cell: validation accuracy ``val`` and held-out predictions right where ``correct`` is 1."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"accuracy": {"after": {"loglik": {"accuracy": val}}}}))
    preds = [{"id": f"q{i}", "label": 0, "pred": 0 if c else 1, "pred_norm": 0 if c else 1}
             for i, c in enumerate(correct)]
    (folder / "eval-test.json").write_text(json.dumps({"accuracy": {"loglik": {
        "accuracy": sum(correct) / len(correct), "accuracy_norm": sum(correct) / len(correct),
        "predictions": preds}}}))


def test_compare_and_the_best_arm_on_validation_are_references(tmp_path):
    """Every arm is paired with the ``--compare`` arms and with the best arm on validation (issue 18: ▽ + levers
    against □ + levers was not a comparison the tables made); the pairs are the per-question differences."""
    import random

    from molora.run.sweep_report import best_on_validation, reference_arms, summarise

    arms = ["▽@train.router_lr_multiplier=10", "□@train.router_lr_multiplier=10", "□"]
    cells = plan_cells(arms, [0, 1])
    slugs = list(dict.fromkeys(c.slug for c in cells))
    rng = random.Random(0)
    right = {slug: {s: [int(rng.random() < p) for _ in range(60)] for s in (0, 1)}
             for slug, p in zip(slugs, (0.7, 0.4, 0.5), strict=True)}
    for c in cells:
        _fake_cell(tmp_path / c.folder, right[c.slug][c.seed], 0.3)
    # the search chose per arm; □ + levers had the best selected validation score, ▽'s other grid point is higher
    # but not selected (a best arm is judged by its selected point), □'s is None (a missing search cell)
    selection = {"primary": "val loglik accuracy", "grid": [{}, {}], "arms": {
        slugs[0]: {"scores": [0.50, 0.60], "selected": 0, "setting": {}},
        slugs[1]: {"scores": [0.55, 0.52], "selected": 0, "setting": {}},
        slugs[2]: {"scores": [None, 0.55], "selected": 1, "setting": {}}}}
    assert best_on_validation(selection) == slugs[1], "ties go to the earlier arm"
    assert best_on_validation(None) is None and best_on_validation({"arms": {}}) is None
    refs = reference_arms(selection, [slugs[2]])
    assert list(refs)[-2:] == [slugs[2], slugs[1]] and refs[slugs[1]] == "best on validation"
    assert reference_arms(selection, [slugs[1]])[slugs[1]] == "--compare, best on validation"

    summary = summarise(tmp_path, plan_cells(arms, [0, 1]), selection=selection, compare=[slugs[2]])
    assert set(summary["references"]) == {slugs[1], slugs[2]}
    item = next(i for i in summary["paired"][f"vs {slugs[1]}"]
                if i["allocation"] == slugs[0] and i["metric"] == "test loglik accuracy")
    diff = sum(sum(right[slugs[0]][s]) - sum(right[slugs[1]][s]) for s in (0, 1)) / 120
    b = item["bootstrap"]
    assert b["diff"] == pytest.approx(diff) and b["lo"] < diff < b["hi"] and b["n_questions"] == 60
    assert item["wins"] == 2 and item["seeds"] == [0, 1]
    md = (tmp_path / "summary.md").read_text()
    assert f"Paired vs {slugs[1]} (best on validation)" in md and f"Paired vs {slugs[2]} (--compare)" in md


def test_without_allocations_the_sweep_runs_the_studys_winner_against_tuned_baselines(assets, tmp_path, capsys):
    """Issue 18.6: the study's winning settings are molora sweep's default arms, every arm tuned alike (the
    recipe's learning rate × 0.5, 1, 2 chosen on validation); a recipe without validation rows is refused before
    any work, since an untuned LoRA is not a baseline."""
    from molora.run.sweep import DEFAULT_ARMS, _parse, _prepare

    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run", train={"learning_rate": 4e-4})
    sw = _prepare(_parse([str(recipe), "--seeds", "0,1"]))
    assert sw.allocations == DEFAULT_ARMS.split(",")
    assert {c.slug for c in sw.cells} == {"inverted_triangle-router_lr_multiplier10-expert_initorthogonal",
                                          "inverted_triangle-router_lr_multiplier1-expert_initkaiming", "lora",
                                          "lora-active", "base"}
    assert [float(g["train.learning_rate"]) for g in sw.grid] == pytest.approx([2e-4, 4e-4, 8e-4])
    assert len(sw.search_cells) == 4 * 3, "every trained arm, every point, on the first seed"
    sw = _prepare(_parse([str(recipe), "--search", "train.learning_rate=1e-3"]))
    assert sw.grid == [{"train.learning_rate": "1e-3"}], "--search replaces the default grid"
    assert _prepare(_parse([str(recipe), "--allocations", "▽,lora"])).grid == [], "named arms: no implicit search"
    sw = _prepare(_parse([str(recipe), "--train.learning_rate", "1e-3"]))
    assert [float(g["train.learning_rate"]) for g in sw.grid] == pytest.approx([5e-4, 1e-3, 2e-3])

    no_val = write_recipe(tmp_path / "n.yaml", assets, tmp_path / "run2", data={"eval_file": None})
    assert _sweep([no_val]) == 2
    err = capsys.readouterr().err
    assert "data.eval_file" in err and "--allocations" in err
    assert not (tmp_path / "run2").exists()


def test_a_recipe_with_the_levers_keeps_distinct_default_arms_and_plain_lora(assets, tmp_path, capsys):
    """A recipe that already sets the study's levers (as the shipped recipes do): the default sweep's MoLA arm
    switches them off explicitly, LoRA stays plain LoRA (kaiming A, top-k router), and two arms that would train
    the same settings are refused before any work."""
    from molora.run.sweep import _parse, _prepare
    from molora.run.sweep_plan import _cell_overrides

    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run",
                          allocation={"expert_init": "orthogonal", "router": "noisy_topk"},
                          train={"router_lr_multiplier": 10})
    sw = _prepare(_parse([str(recipe), "--seeds", "0"]))
    settings = {}
    for c in sw.cells:
        if c.allocation == "base":
            continue
        ov = _cell_overrides(c, 8, 4, tmp_path / "out", active=2)
        r = load_recipe(recipe, parse_overrides(ov))
        settings[c.slug] = (r.allocation.expert_init, r.allocation.router, r.train.router_lr_multiplier)
    assert settings["inverted_triangle-router_lr_multiplier10-expert_initorthogonal"] == ("orthogonal", "noisy_topk", 10)
    assert settings["inverted_triangle-router_lr_multiplier1-expert_initkaiming"] == ("kaiming", "noisy_topk", 1)
    assert settings["lora"][:2] == settings["lora-active"][:2] == ("kaiming", "topk")
    lora_orth = next(c for c in plan_cells(["lora@allocation.expert_init=orthogonal"], [0]))
    r = load_recipe(recipe, parse_overrides(_cell_overrides(lora_orth, 8, 4, tmp_path / "out")))
    assert r.allocation.expert_init == "orthogonal", "an arm's own override still wins over plain LoRA's"

    assert _sweep([str(recipe), "--allocations", "▽,▽@allocation.expert_init=orthogonal,lora"]) == 2
    err = capsys.readouterr().err
    assert "'▽' and '▽@allocation.expert_init=orthogonal' train the same settings" in err
    # plain LoRA is kaiming whatever the recipe says, so an arm asking for orthogonal LoRA is a different run
    _prepare(_parse([str(recipe), "--allocations", "lora,lora@allocation.expert_init=orthogonal", "--seeds", "0"]))
    assert _sweep([str(recipe), "--allocations", "lora,lora@allocation.expert_init=kaiming"]) == 2
    assert "train the same settings" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_arms_are_built_on_the_model_before_any_cell_and_unmatched_budgets_are_flagged(assets, tmp_path, capsys):
    """An arm whose cells cannot be built (top_k above a layer's experts after the sweep's budget) is refused
    before the first cell trains, naming the arm; an arm with more trainable parameters than the budget (a shared
    expert on top of the same experts) is flagged, one that pays for it with a lower expert_budget is not."""
    from molora.run.sweep import _parse, _prepare
    from molora.run.sweep_plan import budget_and_lora_rank, check_arms

    recipe = write_recipe(tmp_path / "r.yaml", assets, tmp_path / "run")
    assert _sweep([str(recipe), "--allocations", "▽,1|2|4@allocation.top_k=2,lora", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "arm '1|2|4@allocation.top_k=2'" in err and "top_k=2 is larger than num_experts=1" in err
    assert not any((tmp_path / "run" / "sweep").glob("*seed0*")), "no cell started"

    sw = _prepare(_parse([str(recipe), "--allocations", "2|2|2|2,2|2|2|2@allocation.shared_expert_r=4,"
                          "2|2|2|2@allocation.shared_expert_r=4@allocation.expert_budget=4,lora", "--seeds", "0"]))
    budget, rank, mix, _ = budget_and_lora_rank(sw.recipe)
    assert budget == 8
    warns = check_arms(str(recipe), sw.overrides, sw.cells, budget, rank, mix, tmp_path / "out")
    assert len(warns) == 1 and warns[0].startswith("arm '2|2|2|2@allocation.shared_expert_r=4':"), warns
    assert "+4" in warns[0], "4 layers × one rank-4 shared expert on a budget of 8 rank-4 experts: about +45 %"
