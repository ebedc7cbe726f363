"""Resuming never runs code from a checkpoint: every ``torch.load`` during a resume unpickles weights only.

molora's own loads (adapters: safetensors; ``weights_only=True`` elsewhere) and the Hugging Face Trainer's
(optimizer, scheduler, RNG states) are safe by themselves. DeepSpeed's are not: its checkpoint engine and
optimizers call ``torch.load(..., weights_only=False)``, so a crafted pickle in a model-states or optimizer shard
would run code on resume. :func:`weights_only_loads` turns every ``torch.load`` inside it into a weights-only load
that accepts, beyond tensors and containers, only the DeepSpeed classes its checkpoints hold
(:data:`DEEPSPEED_CLASSES`: loss scalers, the ZeRO stage enum). Anything else is refused before it is built, with
:class:`UnsafeCheckpointError` naming the file and the global it asked for.

The completion marker's SHA-256 of every file is checked before training starts (:func:`checkpoint.resolve_resume`):
that proves a checkpoint is the one its writer finished, not that its writer is trusted; weights-only unpickling is
what makes a checkpoint someone else made safe to resume from.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
from typing import Iterator

from .checkpoint import CheckpointError

__all__ = ["DEEPSPEED_CLASSES", "UnsafeCheckpointError", "weights_only_loads", "safe_globals"]

#: "module:qualname" of the non-tensor classes a DeepSpeed (0.19) checkpoint pickles; classes whose module is not
#: importable here are skipped (an older or newer DeepSpeed may not have them)
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks the unpickler for something other than weights (the message names file and global)."""


def safe_globals() -> list:
    """The classes :data:`DEEPSPEED_CLASSES` names that this environment has, plus the builtins DeepSpeed state uses
    beside tensors and numpy's array rebuild (RNG states)."""
    found: list = [set, frozenset, slice]
    try:  # numpy RNG states (the Trainer's rng_state*.pth), as transformers' own allow-list has them
        import numpy as np

        core = np._core if hasattr(np, "_core") else np.core
        found += [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    except (ImportError, AttributeError):  # pragma: no cover - numpy comes with torch's users
        pass
    for spec in DEEPSPEED_CLASSES:
        module, _, name = spec.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            continue
        found.append(obj)
    return found


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: ``torch.load`` always unpickles weights only (``weights_only=True`` forced, DeepSpeed's classes
    allowed); a refused file raises :class:`UnsafeCheckpointError` naming it. Restored on exit."""
    import torch

    original = torch.load
    allowed = safe_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        where = os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f)
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            detail = str(e).split("\n")
            what = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[0])
            raise UnsafeCheckpointError(
                f"{where}: refused to unpickle: it asks for more than weights ({what}); a checkpoint from an untrusted "
                f"source can run code when unpickled, so molora loads weights only. Resume from a checkpoint you made "
                f"(or start fresh)") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
