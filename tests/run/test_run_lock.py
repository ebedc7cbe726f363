"""Issue 19.5: one writer per output_dir. A second run fails at once naming the holder; a lock left by a killed
run is taken over; the sweep's cells lock themselves (they are molora train runs)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molora.run.run_lock import HOLDER_FILE, OutputDirBusy, output_dir_lock

from test_train import _isolated_env, assets, write_recipe  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
sys.path[:0] = [{root!r}, {kernels!r}]
from pathlib import Path
from molora.run.run_lock import output_dir_lock
with output_dir_lock(Path({out!r})):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    code = HOLD.format(root=str(ROOT), kernels=str(ROOT / "kernels"), out=str(out))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_fails_at_once_naming_the_holder_and_a_killed_holder_releases(tmp_path):
    out = tmp_path / "run"
    p = _holder(out)
    try:
        t0 = time.perf_counter()
        with pytest.raises(OutputDirBusy, match=rf"in use by another run \(pid {p.pid} on host "):
            with output_dir_lock(out):
                pass
        assert time.perf_counter() - t0 < 5
    finally:
        os.kill(p.pid, signal.SIGKILL)  # as a crash or kill -9: no cleanup runs
        p.wait()
    assert (out / HOLDER_FILE).exists(), "the dead holder's name is left behind ..."
    with output_dir_lock(out):        # ... and its lock is taken over at once
        assert str(os.getpid()) in (out / HOLDER_FILE).read_text()
    assert not (out / HOLDER_FILE).exists()
    with output_dir_lock(out, enabled=False):  # DeepSpeed ranks > 0 do not lock
        pass


def test_molora_train_refuses_an_output_dir_in_use_before_touching_it(assets, tmp_path, capsys):
    from molora.run.train import main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, train={"max_steps": 1},
                          eval={"before": False, "after": False}, report={"wandb": False, "plots": False})
    p = _holder(out)
    try:
        assert main([str(recipe)]) == 2
        err = capsys.readouterr().err
        assert f"pid {p.pid}" in err and "another run" in err
        assert sorted(x.name for x in out.iterdir()) == [".molora.lock", HOLDER_FILE], "nothing written"
        assert main([str(recipe), "--resume", "latest"]) == 2  # a resume beside a live run too
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert main([str(recipe)]) == 0  # the killed holder's lock is taken over
    assert (out / "results.json").is_file() and not (out / HOLDER_FILE).exists()
