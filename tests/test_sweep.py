"""`molora sweep` (issue 9): plan and bad input, a sweep killed mid-cell resumes to the same table as an
uninterrupted one, extra evaluation files, the merged report with intervals and paired comparisons."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from molora.run.sweep import SweepError, parse_cells_spec, plan_cells, summary_markdown

from test_train import _isolated_env, assets, write_recipe  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


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
    ([], "--allocations is required"),
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
    assert _sweep([part, *args], env_extra={"MOLORA_TEST_CRASH_AFTER_CHECKPOINT": "1"}) == 1
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
    assert a["rows"] == b["rows"] and a["paired"] == b["paired"]
    assert b["cells_done"] == 4 and {"val loglik", "validation loglik"} <= set(b["metrics"])
    lora = next(r for r in b["rows"] if r["allocation"] == "lora")
    tri = next(r for r in b["rows"] if r["allocation"] == "inverted_triangle")
    assert abs(lora["trainable params"]["mean"] - tri["trainable params"]["mean"]) / tri["trainable params"]["mean"] \
        < 0.1, "LoRA's rank matches the mixtures' trainable parameters"
    assert (sweep_dir / "summary.png").stat().st_size > 1000
    assert "Paired per seed, vs inverted_triangle" in (sweep_dir / "summary.md").read_text()
    # a third run skips everything; --report alone re-merges
    assert _sweep([part, *args]) == 0
    assert capsys.readouterr().out.count("skipped (finished)") == 4
    assert _sweep([part, *args, "--report"]) == 0


def test_summary_statistics():
    """mean, sample std and the 95 % t half-width over seeds; paired differences."""
    from molora.run.sweep import _ci

    mean, sd, half = _ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.1) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    text = summary_markdown({"cells_done": 1, "cells_planned": 2, "metrics": ["val loglik"], "paired": {},
                             "rows": [{"allocation": "lora", "seeds": [0], "val loglik": {
                                 "mean": 0.5, "std": float("nan"), "ci95": float("nan"), "n": 1, "values": [0.5]}}]})
    assert "| lora | 1 | 0.500 (n=1) | - | - |" in text
