"""Helpers shared by ``molora train``, ``molora eval``, ``molora allocate`` and ``molora sweep``: errors, the run
context the Trainer subclass reads, rank/distributed helpers, a recipe's rows and base model, atomic JSON writes,
and the test hooks that simulate crashes and non-finite losses."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .recipe import Recipe

__all__ = ["plain_doc", "RunError", "RunContext", "is_user_error", "rank_info", "free_port", "dist",
           "barrier", "timer", "load_recipe_rows", "load_base_model", "write_json_atomic"]


class RunError(RuntimeError):
    """A run cannot start or finish (message says why and what to do)."""


def plain_doc(text: str) -> str:
    """A docstring paragraph as ``--help`` prints it: reST roles and literals (``:mod:`x```, double backticks)
    reduced to their text, lines joined."""
    import re

    text = re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", text)
    return re.sub(r"``([^`]*)``", r"\1", " ".join(text.split()))


#: the exceptions that report bad input or a bad state in one line (no traceback): (module, class name)
USER_ERRORS = (("molora.allocation.specs", "AllocationError"), ("molora.run.checkpoint", "CheckpointError"),
               ("molora.run.data_errors", "DataError"), ("molora.run.assets", "AssetError"),
               ("molora.run.common", "RunError"), ("molora.run.nonfinite", "NonFiniteError"),
               ("molora.run.resume", "ResumeError"), ("molora.run.storage", "StorageError"))


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is one of :data:`USER_ERRORS` (or a subclass). Checked by class, among the modules already
    imported: an exception of a class whose module was never imported cannot exist, and importing it here would
    load torch on an error path."""
    classes = tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules)
    return isinstance(e, classes)


def rank_info() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist():
    """torch.distributed when more than one rank runs, else None."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        return tdist
    return None


def barrier() -> None:
    d = dist()
    if d is not None:
        d.barrier()


@dataclass
class RunContext:
    recipe: Recipe
    is_main: bool
    zero3: bool
    aux_loss_coef: float
    allocation: Any
    metrics: Any
    telemetry: Any = None
    use_wandb: bool = False
    logits_at_labels_only: bool = False
    tuner: Any = None
    skipped_this_step: bool = False
    setup: Any = None
    fingerprint: Any = None
    checkpoint_bytes: int = 0
    rss_interval_max: int = 0
    #: molora.run.cpu_threads.SlowStepWatch of a CPU run (None on GPU)
    slow_watch: Any = None


@contextmanager
def timer(store: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = round(time.perf_counter() - t0, 2)


def load_recipe_rows(recipe: Recipe, out: Path, is_main: bool):
    """(train rows, eval rows or None, data paths) from the recipe: a packaged data set (written first), local
    files, or a Hugging Face dataset (``data.hf_dataset``; see :mod:`molora.run.hf_data`)."""
    from .data import load_rows, split_validation

    d = recipe.data
    paths: dict[str, str] = {}
    eval_rows = None
    eval_file = Path(d.eval_file) if d.eval_file else None
    if d.hf_dataset is not None:
        from .hf_data import load_hf_rows

        hf = dict(name=d.hf_dataset, subset=d.hf_subset, columns=d.columns, where=d.hf_where, format=d.format)
        label = d.hf_dataset + (f"/{d.hf_subset}" if d.hf_subset else "")
        train_rows = load_hf_rows(split=d.hf_split, **hf)
        train_file = f"{label} [{d.hf_split}]"
        if d.hf_eval_split is not None:
            eval_rows = load_hf_rows(split=d.hf_eval_split, **hf)
            paths["eval_file"] = f"{label} [{d.hf_eval_split}]"
    else:
        if d.packaged is not None:
            from .assets import write_packaged_dataset

            # deterministic and written atomically: every rank may write it
            written = write_packaged_dataset(d.packaged, out / "data", n_validation=d.validation_size,
                                             seed=recipe.train.seed)
            train_file, eval_file = written["train"], written["validation"]
        else:
            train_file = Path(d.train_file)
        train_rows = load_rows(train_file, format=d.format)
    paths["train_file"] = str(train_file)
    if eval_rows is None and eval_file is not None:
        eval_rows = load_rows(eval_file, format=d.format)
        paths["eval_file"] = str(eval_file)
    elif eval_rows is None and len(train_rows) > d.validation_size:
        train_rows, eval_rows = split_validation(train_rows, d.validation_size, seed=recipe.train.seed)
        paths["eval_file"] = f"{train_file} (validation_size={d.validation_size} rows carved out, seed {recipe.train.seed})"
    if d.max_train_examples is not None:
        train_rows = train_rows[: d.max_train_examples]
    return train_rows, eval_rows, paths


def load_base_model(recipe: Recipe):
    """(model, tokenizer) of ``recipe.model`` in its ``dtype`` (packaged name, local path or cached HF id), with its
    block projections quantized by bitsandbytes when ``model.load_in_4bit`` / ``load_in_8bit`` is set."""
    import torch

    from .assets import load_model_and_tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}[recipe.model.dtype]
    return load_model_and_tokenizer(recipe.model.name_or_path, dtype=dtype,
                                    quantization=recipe.model.bnb_config_kwargs())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=str))
