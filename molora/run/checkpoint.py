"""Adapter-only, atomic, resumable checkpoints.

Layout of ``OUTPUT_DIR/checkpoint-<step>/``: the adapter (``adapter_config.json``, ``adapter_model.safetensors``,
written by PEFT's ``save_pretrained``), the Hugging Face Trainer's resume state (optimizer, scheduler, RNG per
rank, ``trainer_state.json`` with the step and data position; under DeepSpeed the engine's
``global_step<N>/`` with frozen parameters excluded) and, written last, the marker :data:`MARKER`.

Atomicity: a checkpoint is written into ``OUTPUT_DIR/.tmp-checkpoint-<step>``; when every rank has written its
part, rank 0 fsyncs every file, writes the marker (fsync'd), and renames the directory to ``checkpoint-<step>``
(then fsyncs ``OUTPUT_DIR``). A directory without a valid marker — a crash mid-write, a copy in progress — is
never resumed from: :func:`find_latest` skips it and :func:`resolve_resume` refuses it.

Under ZeRO-3 the adapter parameters are partitioned across ranks; :func:`save_adapter` gathers only them
(``deepspeed.zero.GatheredParameters``) before rank 0 writes, and refuses to write empty tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["MARKER", "CheckpointError", "is_complete", "list_checkpoints", "find_latest", "resolve_resume",
           "fsync_tree", "write_marker", "commit_dir", "save_adapter", "check_allocation", "clean_staging",
           "staging_dir"]

MARKER = "molora_complete.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".tmp-"
FORMAT = 2  # 2: every listed file carries its SHA-256 (1: sizes, hashes optional)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, incomplete, or made for another allocation)."""


# --------------------------------------------------------------------------------------------- filesystem


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(str(path), flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_tree(root: Union[str, os.PathLike], hashes: bool = False) -> list[dict[str, Any]]:
    """fsync every file and directory under ``root``; return ``[{"path", "size"(, "sha256")}]`` of the files
    (sorted)."""
    root = Path(root)
    files = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            _fsync_path(p)
            entry = {"path": str(p.relative_to(root)), "size": p.stat().st_size}
            if hashes:
                entry["sha256"] = sha256_file(p)
            files.append(entry)
        _fsync_path(Path(dirpath), directory=True)
    return sorted(files, key=lambda f: f["path"])


def write_marker(directory: Union[str, os.PathLike], info: dict[str, Any]) -> Path:
    """Write the completion marker last (temp file + fsync + rename)."""
    directory = Path(directory)
    files = fsync_tree(directory, hashes=True)
    payload = {"format": FORMAT, "complete": True, "time": time.time(), "files": files, **info}
    tmp = directory / (MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MARKER)
    _fsync_path(directory, directory=True)
    return directory / MARKER


def read_marker(directory: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    try:
        data = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("complete") is True else None


def is_complete(directory: Union[str, os.PathLike], check_files: bool = True) -> bool:
    """True when ``directory`` holds a valid marker and (``check_files``) every file it lists, at its size."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None:
        return False
    if check_files:
        for f in marker.get("files", []):
            p = directory / f["path"]
            try:
                if p.stat().st_size != f["size"]:
                    return False
            except OSError:
                return False
    return True


def verify_hashes(directory: Union[str, os.PathLike]) -> None:
    """Check every file the completion marker lists against its recorded size and SHA-256.

    Raises :class:`CheckpointError` naming the first file that is missing or differs, or (format 2) a marker listing
    no files or a file without its hash. No marker, or a format-1 marker without hashes, passes."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None:
        return
    files, fmt = marker.get("files"), marker.get("format")
    if (not isinstance(fmt, int) or fmt >= 2) and not (isinstance(files, list) and files and all(
            isinstance(f, dict) and f.get("sha256") and "path" in f and "size" in f for f in files)):
        raise CheckpointError(f"{directory / MARKER}: a format-{fmt} marker must list every file with its size and "
                              f"SHA-256; this one does not (edited, or stripped of its hashes): nothing there is trusted")
    for f in files or []:
        p = directory / f["path"]
        try:
            size = p.stat().st_size
        except OSError:
            raise CheckpointError(f"{p}: listed in {MARKER} but missing") from None
        if size != f["size"]:
            raise CheckpointError(f"{p}: {size} bytes, {MARKER} recorded {f['size']} (truncated or replaced)")
        want = f.get("sha256")
        if want is not None and sha256_file(p) != want:
            raise CheckpointError(f"{p}: content differs from the SHA-256 recorded in {MARKER} (corrupted on disk)")


def staging_dir(run_dir: Union[str, os.PathLike], name: str) -> Path:
    return Path(run_dir) / f"{STAGING_PREFIX}{name}"


def commit_dir(tmp: Union[str, os.PathLike], final: Union[str, os.PathLike]) -> Path:
    """Rename the finished ``tmp`` to ``final`` (replacing an older ``final``) and fsync the parent."""
    tmp, final = Path(tmp), Path(final)
    trash = None
    if final.exists():
        trash = final.with_name(f"{STAGING_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_path(final.parent, directory=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def clean_staging(run_dir: Union[str, os.PathLike]) -> list[Path]:
    """Remove staging directories a crashed run left behind (call on rank 0 before training)."""
    removed = []
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return removed
    for p in run_dir.iterdir():
        if p.is_dir() and p.name.startswith(STAGING_PREFIX) and ("checkpoint-" in p.name or "adapter" in p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def list_checkpoints(run_dir: Union[str, os.PathLike], complete_only: bool = True) -> list[Path]:
    """``checkpoint-<step>`` directories of ``run_dir`` sorted by step (only complete ones by default)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (not complete_only or is_complete(p)):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest(run_dir: Union[str, os.PathLike], verify: bool = False) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None. Incomplete ones are skipped; with ``verify`` the
    content hashes are checked too, and a corrupted checkpoint is skipped with a message naming the file (the
    previous complete one is used)."""
    for cp in reversed(list_checkpoints(run_dir)):
        if not verify:
            return cp
        try:
            verify_hashes(cp)
        except CheckpointError as e:
            print(f"molora: skipping corrupted checkpoint {cp.name}: {e}", flush=True)
            continue
        return cp
    return None


def resolve_resume(value: Optional[str], run_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """``--resume`` -> a checkpoint directory (or None to start fresh).

    ``latest``: the newest complete checkpoint in ``run_dir`` (None when there is none: a fresh start).
    A path: must be a complete checkpoint (or a run directory, whose latest complete checkpoint is used).
    """
    if value is None:
        return None
    if value == "latest":
        latest = find_latest(run_dir, verify=True)
        skipped = [p.name for p in list_checkpoints(run_dir, complete_only=False) if not is_complete(p)]
        if skipped:
            print(f"molora: ignoring incomplete checkpoint(s) without a valid {MARKER}: {', '.join(skipped)}",
                  flush=True)
        return latest
    p = Path(value).expanduser()
    if not p.exists():
        raise CheckpointError(f"--resume {value}: no such checkpoint directory")
    if not is_complete(p):
        inner = find_latest(p, verify=True) if p.is_dir() else None
        if inner is not None:
            return inner.resolve()
        raise CheckpointError(f"--resume {value}: not a complete checkpoint (no valid {MARKER}: it was not fully "
                              f"written, or its files changed since); resume from another one, e.g. --resume latest")
    try:
        verify_hashes(p)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {value}: {e}; resume from another checkpoint, e.g. --resume latest") from None
    return p.resolve()


# --------------------------------------------------------------------------------------------- adapter
def _adapter_state(model) -> dict:
    """The saved adapter's parameters by full name: the trainable ones and frozen one-expert routers."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad or ".molora_" in n}


def save_adapter(model, out_dir: Union[str, os.PathLike], *, is_main: bool, zero3: bool = False,
                 safe_serialization: bool = True) -> Optional[Path]:
    """Save the adapter of a PeftModel with PEFT's ``save_pretrained`` (adapter_config.json + safetensors).

    Collective under ZeRO-3 (every rank must call it): the trainable parameters are gathered first. Only
    ``is_main`` writes. Raises :class:`CheckpointError` instead of writing an empty or partial tensor.
    """
    out_dir = Path(out_dir)
    ctx = nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(_adapter_state(model).values()), modifier_rank=None)
    with ctx:
        if not is_main:
            return None
        state = {n: p.detach().to("cpu").clone().contiguous() for n, p in _adapter_state(model).items()}
        if not state:
            raise CheckpointError("the model has no trainable parameters: no adapter to save")
        empty = [k for k, v in state.items() if v.numel() == 0]
        if empty:
            raise CheckpointError(f"refusing to save empty adapter tensors (ZeRO-3 parameters not gathered?): "
                                  f"{empty[:3]}")
        from .nonfinite import check_finite_state

        check_finite_state(state, f"refusing to save {out_dir}")
        out_dir.mkdir(parents=True, exist_ok=True)
        # PEFT filters the adapter's keys out of a full-name state dict and strips the adapter name
        model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=safe_serialization)
    return out_dir


def _adapter_name(model) -> str:
    return getattr(model, "active_adapter", "default") or "default"


def check_allocation(checkpoint: Union[str, os.PathLike], model) -> None:
    """Raise ``molora.AllocationError`` when the checkpoint's saved allocation differs from ``model``'s.

    The allocation table is stored in ``adapter_config.json`` (``allocation``, ``num_layers``) by the core; the
    message lists the layers that differ.
    """
    from ..allocation import AllocationError
    from ..tuner.model import _allocation_mismatch

    path = Path(checkpoint) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{checkpoint}: cannot read adapter_config.json ({e})") from None
    cfg = model.peft_config[_adapter_name(model)]
    now, now_layers = cfg.allocation, cfg.num_layers
    s_alloc, s_layers = saved.get("allocation"), saved.get("num_layers")
    if s_alloc is None:
        return
    if s_alloc != now or s_layers != now_layers:
        raise AllocationError(f"checkpoint {checkpoint} was trained with a different allocation than this recipe: "
                              + _allocation_mismatch(s_alloc, now, s_layers, now_layers)
                              + ". Resume with the recipe it was made with, or start a new output_dir.")
    for key in ("lora_alpha", "router"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise AllocationError(f"checkpoint {checkpoint} has {key}={saved[key]!r} but the recipe has "
                                  f"{getattr(cfg, key)!r}; resume with the recipe it was made with")


# --------------------------------------------------------------------------------------------- loading, checked

WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter_tensors(adapter_dir: Union[str, os.PathLike]) -> tuple[Path, dict]:
    """The adapter tensors of ``adapter_dir`` (a final adapter or a checkpoint), checked.

    Raises :class:`CheckpointError` naming the file when the directory, its ``adapter_config.json`` or its
    weights are missing, unreadable or truncated, or when its completion marker lists hashes that the files no
    longer match; :class:`molora.run.nonfinite.NonFiniteError` when a tensor holds nan/inf. Nothing is ever looked
    up on a hub: a directory without weights is an error here, not a repository id.
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such adapter directory")
    cfg = d / "adapter_config.json"
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except OSError:
        raise CheckpointError(f"{d} is not an adapter directory: {cfg.name} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}); the file is corrupted") from None
    weights = next((d / n for n in WEIGHTS_NAMES if (d / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{d} holds no adapter weights (expected {WEIGHTS_NAMES[0]}); it was not fully written "
                              f"or was emptied; nothing is fetched from a hub")
    verify_hashes(d)
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            import torch

            state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise their own types for a bad file
        size = weights.stat().st_size
        raise CheckpointError(f"{weights}: unreadable ({size} bytes: truncated or corrupted): "
                              f"{type(e).__name__}: {e}") from None
    if not state:
        raise CheckpointError(f"{weights}: holds no tensors")
    from .nonfinite import check_finite_state

    check_finite_state(state, str(weights))
    return weights, state


def load_adapter_checked(base_model, adapter_dir: Union[str, os.PathLike], is_trainable: bool = False,
                         checked: Optional[tuple[Path, dict]] = None):
    """``PeftModel.from_pretrained(base_model, adapter_dir)`` after :func:`read_adapter_tensors` (or with its
    result ``checked`` when the caller already ran it), and an error (not PEFT's warning) when the file lacks a
    tensor the model's adapter needs."""
    from peft import PeftModel

    from ..tuner.compat import peft_wrap

    weights, state = checked if checked is not None else read_adapter_tensors(adapter_dir)
    model = peft_wrap(lambda: PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable),
                      base_model)
    name = _adapter_name(model)
    wanted = {n.replace(f".{name}.", ".").removesuffix(f".{name}") for n, _ in model.named_parameters()
              if "molora_" in n}
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"{weights}: {len(missing)} adapter tensor(s) missing, e.g. {', '.join(missing[:3])} "
                              f"(the file is incomplete or from another allocation)")
    return model


def load_adapter_weights(model, checkpoint: Union[str, os.PathLike], zero3: bool = False) -> None:
    """Copy a checkpoint's (checked) adapter tensors into ``model`` (a PeftModel); collective under ZeRO-3."""
    from peft import set_peft_model_state_dict

    weights, state = read_adapter_tensors(checkpoint)
    ctx = nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(_adapter_state(model).values()), modifier_rank=0)
    with ctx:
        result = set_peft_model_state_dict(model, state, adapter_name=_adapter_name(model))
    missing = [k for k in getattr(result, "missing_keys", []) if "molora_" in k]
    if missing:
        raise CheckpointError(f"{weights}: adapter tensors missing: {', '.join(missing[:3])}")
