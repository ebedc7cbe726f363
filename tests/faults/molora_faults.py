"""Fault injection for the reliability tests, kept out of molora: a crash right after a checkpoint is committed
(as if the process were killed) and a non-finite loss reported by one rank.

Set in the environment (read when the fault would fire, so ``monkeypatch.setenv`` works in-process):

* ``MOLORA_FAULT_CRASH_AFTER_CHECKPOINT=N``: :class:`SimulatedCrash` right after checkpoint N is committed (no final
  adapter, no cleanup);
* ``MOLORA_FAULT_NAN_LOSS_AT=STEP:RANK``: that rank reports a nan loss in that step, after a finite backward (the
  multi-rank agreement test).

In the test process the conftest calls :func:`install_on_import`; child processes (sweep cells, DeepSpeed ranks)
get it from ``sitecustomize.py`` in this folder when :func:`child_env` puts the folder on their PYTHONPATH.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = "molora.run.trainer_class"
CRASH = "MOLORA_FAULT_CRASH_AFTER_CHECKPOINT"
NAN = "MOLORA_FAULT_NAN_LOSS_AT"


class SimulatedCrash(BaseException):
    """Raised right after checkpoint N is committed (a BaseException: nothing in molora catches it)."""


def install(module) -> None:
    """Wrap the Trainer subclass of ``module`` (molora.run.trainer_class) once."""
    cls = module.MoLoRATrainer
    if getattr(cls, "_molora_faults", False):
        return
    save, reported = cls._save_checkpoint, cls.reported_loss

    def _save_checkpoint(self, model, trial):
        save(self, model, trial)
        if os.environ.get(CRASH) == str(self.state.global_step):
            raise SimulatedCrash(f"simulated crash after checkpoint {self.state.global_step}")

    def reported_loss(self, loss):
        loss = reported(self, loss)
        spec = os.environ.get(NAN)
        if spec and tuple(map(int, spec.split(":"))) == (self.state.global_step + 1, self.args.process_index):
            return loss * float("nan")
        return loss

    cls._save_checkpoint, cls.reported_loss, cls._molora_faults = _save_checkpoint, reported_loss, True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches molora.run.trainer_class right after it is first imported (it imports transformers: not before)."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            install(module)

        spec.loader.exec_module = exec_module
        return spec


def install_on_import() -> None:
    if TARGET in sys.modules:
        install(sys.modules[TARGET])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def child_env(**faults: str) -> dict[str, str]:
    """Environment entries for a child process with the faults installed: ``{PYTHONPATH, MOLORA_FAULT_...}``."""
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, **faults}
