"""Issue 21.1: the thread count a run uses, and the warning when steps slow down on a shared machine."""
from __future__ import annotations

import os

import pytest
import torch

from molora.run.cpu_threads import SlowStepWatch, available_cores, configure_threads, default_threads

from test_train import _isolated_env, assets, write_recipe  # noqa: F401 (fixtures)


def test_default_respects_omp_then_affinity_divided_by_local_ranks(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert available_cores() == 8 and default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_threads() == 1


def test_configure_sets_torch_threads_and_says_why(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == (1, "train.threads") and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert configure_threads(None) == (2, "OMP_NUM_THREADS") and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_slow_steps_warn_once_naming_the_setting():
    w = SlowStepWatch(threads=4)
    assert w.observe(10, 60.0) is None and w.observe(10, 50.0) is None  # calibration: 5 s/step
    assert w.calibration == pytest.approx(5.0)
    assert w.observe(10, 140.0) is None                                 # 2.8x: within the factor
    msg = w.observe(10, 200.0)                                          # 4x
    assert msg and "4.0x the 5.0 s" in msg and "--train.threads 2" in msg and "OMP_NUM_THREADS=2" in msg
    assert w.observe(10, 900.0) is None, "once"
    assert SlowStepWatch(threads=1).observe(0, 1.0) is None


def test_a_run_reports_its_threads_and_seconds_per_step(assets, tmp_path, capsys):
    import json

    from molora.run.train import main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, train={"max_steps": 2, "logging_steps": 1,
                                                                   "threads": 1},
                          eval={"before": False, "after": False}, report={"wandb": False, "plots": False})
    before = torch.get_num_threads()
    try:
        assert main([str(recipe)]) == 0
    finally:
        torch.set_num_threads(before)
    assert "molora: CPU threads: 1 (train.threads;" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["s_per_step"] > 0 for r in rows if r["type"] == "train" and r["step"] > 1)
