"""scripts/study.sh: the README's study, end to end, with a recording stand-in for `molora`.

The script only orchestrates `molora split` and `molora sweep`; these tests check the orchestration (the slices carved,
the phases in order, every worker's share, the held-out file of each task, arms that parse) without training.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from molora.run.sweep_plan import parse_arm

REPO = Path(__file__).resolve().parents[2]


def _setup(tmp_path: Path, with_data: bool = True) -> tuple[Path, Path, Path]:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "study.sh", root / "scripts" / "study.sh")
    data = tmp_path / "data"
    if with_data:
        for f in ("csqa/train.jsonl", "csqa/validation.jsonl", "obqa/train.jsonl"):
            (data / f).parent.mkdir(parents=True, exist_ok=True)
            (data / f).write_text('{"input": "q", "choices": ["a", "b"], "answer": "a"}\n')
    log = tmp_path / "calls.txt"
    fake = tmp_path / "fake_molora"
    # one write per call: the two tasks run side by side, and two appends per call could interleave their lines
    fake.write_text(f'#!/usr/bin/env bash\nline=$(printf "%q " "$@")\nprintf "%s\\n" "$line" >> {shlex.quote(str(log))}\n')
    fake.chmod(0o755)
    return root, data, fake


def _run(root: Path, data: Path, fake: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "DATA": str(data), "MOLORA": str(fake), **env}
    return subprocess.run(["bash", str(root / "scripts" / "study.sh"), *args], env=full, capture_output=True,
                          text=True, timeout=60)


def _calls(tmp_path: Path) -> list[list[str]]:
    return [shlex.split(line) for line in (tmp_path / "calls.txt").read_text().splitlines() if line.strip()]


def _opt(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


def test_study_script_carves_slices_then_searches_then_final_then_reports_per_task(tmp_path):
    root, data, fake = _setup(tmp_path)
    r = _run(root, data, fake, "2", EXTRA="--train.max_steps 200")
    assert r.returncode == 0, r.stderr
    calls = _calls(tmp_path)
    splits = [c for c in calls if c[0] == "split"]
    assert [(c[1], _opt(c, "--sizes")) for c in splits] == [
        (f"{data}/csqa/train.jsonl", "dev=500"), (f"{data}/obqa/train.jsonl", "dev=500,test=500")]
    assert calls.index(splits[-1]) < min(i for i, c in enumerate(calls) if c[0] == "sweep")
    for task, heldout in (("csqa", f"{data}/csqa/validation.jsonl"), ("obqa", "runs/data/obqa/test.jsonl")):
        sweeps = [c for c in calls if c[0] == "sweep" and c[1] == f"recipes/study/{task}_smollm2.yaml"]
        kinds = [("report" if "--report" in c else _opt(c, "--phase")) for c in sweeps]
        assert kinds == ["search", "search", "final", "final", "report"], (task, kinds)
        assert sorted(_opt(c, "--cells") for c in sweeps[:2]) == ["1/2", "2/2"]
        for c in sweeps:
            # every choice is made on the recipe's validation file; the held-out file is only scored
            assert _opt(c, "--eval-file") == heldout
            assert _opt(c, "--train.max_steps") == "200"
            arms = _opt(c, "--allocations").split(",")
            parsed = [parse_arm(a) for a in arms]          # raises on an arm the sweep would refuse
            names = {a.allocation for a in parsed}
            assert {"lora", "lora-active", "base"} <= names
            assert any(dict(a.overrides).get("train.router_lr_multiplier") == "10" for a in parsed)
        assert (root / "runs" / "study" / "logs" / f"{task}-report.log").exists()


def test_study_script_refuses_missing_task_files_before_running_anything(tmp_path):
    root, data, fake = _setup(tmp_path, with_data=False)
    r = _run(root, data, fake)
    assert r.returncode == 2
    assert f"{data}/csqa/train.jsonl not found" in r.stderr and "DATA" in r.stderr
    assert not (tmp_path / "calls.txt").exists()


def test_study_script_takes_arms_from_the_environment(tmp_path):
    arms = "▽,lora,base"
    root, data, fake = _setup(tmp_path)
    assert _run(root, data, fake, ARMS=arms).returncode == 0
    sweeps = [c for c in _calls(tmp_path) if c[0] == "sweep"]
    assert sweeps and all(_opt(c, "--allocations") == arms for c in sweeps)
    assert all(_opt(c, "--cells") == "1/1" for c in sweeps if "--phase" in c)
