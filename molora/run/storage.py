"""The output directory: writable before anything loads, room for a checkpoint, and disk-full errors that say
where and how much.

``molora train`` calls :func:`check_writable` before it reads data or loads a model, and
:func:`check_free_space` once the adapter's size is known (before the first step). A write that still fails
for lack of space (another process filled the disk) is turned into a :class:`StorageError` naming the path,
the bytes the write needed and the bytes free, instead of ``OSError: [Errno 28]`` or torch's
``basic_ios::clear: iostream error``.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = ["StorageError", "check_writable", "check_free_space", "checkpoint_bytes", "disk_full_guard",
           "is_disk_full"]

#: what torch's C++ writers say when the disk is full (no errno reaches Python)
#: how torch's zip writer reports a full disk (it loses errno): a failed write, or the position check after one
#: (``unexpected pos 64 vs 0``)
_TORCH_WRITE_FAILURES = ("iostream error", "file write failed", "PytorchStreamWriter failed writing", "unexpected pos")


class StorageError(OSError):
    """The output directory cannot take the run's files (not writable, or no space left)."""


def _fmt(n: Union[int, float]) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def check_writable(out: Union[str, os.PathLike], key: str = "train.output_dir") -> Path:
    """Create ``out`` (and parents) and write, fsync and delete a probe file in it; raise :class:`StorageError`
    naming the directory and the reason when that fails."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{key} {out} cannot be created: {e.strerror or e} ({e.filename or out}); choose "
                           f"another directory") from None
    probe = out / f".molora-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"molora")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise StorageError(f"{key} {out} is not writable: {e.strerror or e}; choose another directory or fix its "
                           f"permissions") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return out


def free_bytes(path: Union[str, os.PathLike]) -> Optional[int]:
    try:
        return shutil.disk_usage(str(path)).free
    except OSError:
        return None


def checkpoint_bytes(trainable_params: int, optimizer_states: int = 2) -> int:
    """Rough size of one checkpoint: fp32 adapter + ``optimizer_states`` fp32 tensors per parameter (AdamW's
    moments) + 1 MB of small files."""
    return int(trainable_params) * 4 * (1 + optimizer_states) + (1 << 20)


def check_free_space(out: Union[str, os.PathLike], need: int, what: str) -> None:
    """Raise :class:`StorageError` when the file system of ``out`` has less than ``need`` bytes free."""
    free = free_bytes(out)
    if free is not None and free < need:
        raise StorageError(f"not enough disk space in {out} for {what}: needs about {_fmt(need)}, "
                           f"{_fmt(free)} free; free some space or choose another train.output_dir")


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES)


@contextmanager
def disk_full_guard(path: Union[str, os.PathLike], need: int, what: str) -> Iterator[None]:
    """Turn a disk-full failure while writing ``what`` to ``path`` into a :class:`StorageError` with the numbers."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e) or isinstance(e, StorageError):
            raise
        free = free_bytes(Path(path).parent if not Path(path).exists() else path)
        raise StorageError(f"disk full while writing {what} to {path}: it needs about {_fmt(need)}, "
                           f"{_fmt(free) if free is not None else 'unknown'} free ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); free some space and resume with --resume latest "
                           f"(the last complete checkpoint is intact)") from None
