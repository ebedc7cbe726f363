"""Old import paths of the flat 0.1 layout, kept working for one release (until molora 0.3).

molora 0.2 split the package into three wings: :mod:`molora.tuner` (the PEFT method), :mod:`molora.allocation`
and :mod:`molora.run` (the training application). ``import molora.config`` or ``from molora.train import main``
still work: a finder on ``sys.meta_path`` answers the old name with the new module (the same object, so
monkeypatching either name patches both) and warns once per name with a :class:`FutureWarning` naming the new
path. ``python -m molora.train`` (and ``deepspeed --module molora.train``) still run the command too.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_TUNER = ("config", "layer", "model", "injection", "summary", "convert", "registry", "router_state", "compat")
_RUN = ("recipe", "data", "evaluation", "label_logits", "eval_run", "checkpoint", "resume", "storage", "nonfinite",
        "host_memory", "telemetry", "report", "diagnostics", "sweep", "cli", "assets", "train")
#: old module name -> new module name
MOVED: dict[str, str] = {**{f"molora.{m}": f"molora.tuner.{m}" for m in _TUNER},
                         **{f"molora.{m}": f"molora.run.{m}" for m in _RUN}}
#: old modules that ran as ``python -m OLD``: the function their ``__main__`` called
_MAINS = {"molora.train": "main", "molora.eval_run": "main", "molora.cli": "main", "molora.sweep": "main",
          "molora.report": "main"}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module name with the module at its new path (see the module doc)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} has moved to {new}; the old path works until molora 0.3",
                      FutureWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the new module is already imported

    def get_code(self, fullname):
        """``python -m OLD``: run the new module's entry point."""
        func = _MAINS.get(fullname)
        if func is None:
            raise ImportError(f"{fullname} has moved to {MOVED[fullname]} and has no command to run")
        src = (f"import sys\nprint('molora: {fullname} has moved to {MOVED[fullname]}; use `python -m "
               f"{MOVED[fullname]}` (the old path works until molora 0.3)', file=sys.stderr)\n"
               f"from {MOVED[fullname]} import {func}\nsys.exit({func}())\n")
        return compile(src, f"<{fullname}>", "exec")

    def is_package(self, fullname) -> bool:
        return False


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
