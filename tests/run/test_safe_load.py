"""Issue 19.6: resuming never runs code from a checkpoint. A crafted pickle in every file kind a resume unpickles
(the Trainer's optimizer, scheduler and RNG state; DeepSpeed's model-states and optimizer shards, loaded by
DeepSpeed's own code with ``weights_only=False``) is refused naming the file, and its payload never runs, even
when the checkpoint's completion marker was re-written to match (a checkpoint someone else made)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from test_train import _isolated_env, assets, write_recipe  # noqa: F401 (fixtures)

SENTINEL_ENV = "MOLORA_TEST_PAYLOAD_SENTINEL"


class Payload:
    """Unpickling this calls ``os.system`` (touches the sentinel file): what a malicious checkpoint does."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _poison(path: Path, sentinel: Path) -> None:
    """Replace ``path`` by a valid torch file whose state holds the payload beside the real content."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.save({"state": state, "x": Payload(sentinel)} if not isinstance(state, dict)
               else {**state, "extra": Payload(sentinel)}, path)


def test_the_payload_really_runs_without_the_guard(tmp_path):
    """The test's payload is live: a plain weights_only=False load runs it (what DeepSpeed does)."""
    sentinel = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "p": Payload(sentinel)}, tmp_path / "f.pt")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_refuses_a_payload_in_every_trainer_file(assets, tmp_path, capsys, monkeypatch, name):
    from molora.run.checkpoint import MARKER, read_marker, write_marker
    from molora.run.train import main
    from molora_faults import CRASH, SimulatedCrash

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", assets, out, eval={"before": False, "after": False},
                          train={"max_steps": 4, "save_steps": 2})
    monkeypatch.setenv(CRASH, "2")
    with pytest.raises(SimulatedCrash):
        main([str(recipe)])
    monkeypatch.delenv(CRASH)
    ckpt = out / "checkpoint-2"
    sentinel = tmp_path / "ran"
    _poison(ckpt / name, sentinel)
    info = {k: v for k, v in read_marker(ckpt).items() if k not in ("format", "complete", "time", "files")}
    (ckpt / MARKER).unlink()
    write_marker(ckpt, info)  # the hashes match the poisoned file: only the unpickling can stop it
    capsys.readouterr()
    assert main([str(recipe), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert not sentinel.exists(), "the checkpoint ran code"
    line = next(ln for ln in err.splitlines() if "refused to unpickle" in ln)
    assert f"{ckpt / name}: refused to unpickle: it asks for more than weights" in line and "system" in line, line
    assert "Traceback" not in err


def _deepspeed_loaders():
    """DeepSpeed's own loading calls that take ``weights_only=False``: its checkpoint engine (model states, ZeRO
    optimizer shards) and the optimizer's universal-checkpoint path."""
    ds = pytest.importorskip("deepspeed")  # noqa: F841
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = TorchCheckpointEngine()
    return {"checkpoint_engine": lambda p: engine.load(str(p), map_location=torch.device("cpu")),
            "torch_load_false": lambda p: torch.load(str(p), weights_only=False)}


@pytest.mark.parametrize("kind", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_deepspeed_loads_inside_the_guard_refuse_a_payload(tmp_path, kind):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from molora.run.safe_load import UnsafeCheckpointError, weights_only_loads

    sentinel = tmp_path / "ran"
    clean = {"module": {"w": torch.ones(2)}, "loss_scaler": LossScaler(1.0), "dyn": DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                                                          consecutive_hysteresis=False),
             "zero_stage": ZeroStageEnum.gradients, "param_shapes": [{"w": torch.Size([2])}], "ds_version": "0.19.8"}
    (tmp_path / "clean").mkdir()
    torch.save(clean, tmp_path / "clean" / kind)
    torch.save({**clean, "x": Payload(sentinel)}, tmp_path / kind)
    for how, load in _deepspeed_loaders().items():
        with weights_only_loads():
            state = load(tmp_path / "clean" / kind)  # DeepSpeed's own classes are allowed
            assert state["zero_stage"] == ZeroStageEnum.gradients and state["loss_scaler"].cur_scale == 1.0
            with pytest.raises(UnsafeCheckpointError, match=rf"{kind}: refused to unpickle.*system"):
                load(tmp_path / kind)
        assert not sentinel.exists(), f"{how}: the payload ran"
    assert torch.load is not None and "weights_only" not in getattr(torch.load, "__qualname__", "")
