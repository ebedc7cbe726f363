"""One writer per ``output_dir``: an exclusive lock held for the whole of a ``molora train`` run.

Two runs writing one folder corrupt each other (interleaved ``metrics.jsonl`` rows, one run's checkpoints
overwritten by the other's, a ``--resume latest`` started beside a live run duplicating steps). The lock is an
operating-system file lock (``filelock``: ``fcntl.flock`` on POSIX) on ``OUTPUT_DIR/.molora.lock``, taken before the
folder is read or written and held until the run ends. The kernel drops it when the holder dies, so a lock left by a
killed run (kill -9, a crash, a lost node) is taken over at once by the next run; nothing stale to clean up. Who holds
it (pid, host, command, start time) is written beside it in ``.molora.lock.json``, so a second run fails at once
naming the holder. Under DeepSpeed only global rank 0 takes it (every rank of one run shares the folder).

The lock is advisory and works where ``flock`` does: local disks and most network file systems mounted with locking
(NFSv4, Lustre with ``flock``); on a file system without locking it is taken by everyone, as if it did not exist.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["OutputDirBusy", "output_dir_lock", "LOCK_FILE", "HOLDER_FILE"]

LOCK_FILE = ".molora.lock"
HOLDER_FILE = ".molora.lock.json"


from .common import RunError, write_json_atomic


class OutputDirBusy(RunError):
    """Another live run holds the output folder's lock (the message names it)."""


def _holder(out: Path) -> str:
    try:
        h = json.loads((out / HOLDER_FILE).read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
        return f"pid {h.get('pid')} on host {h.get('host')}, started {started}: {h.get('command', '?')}"
    except (OSError, ValueError, AttributeError):
        return "a process that has not written its name yet"


@contextmanager
def output_dir_lock(out: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of ``out`` (created if missing) for the body; OutputDirBusy at once when another
    live process holds it. ``enabled=False`` (DeepSpeed ranks other than 0) does nothing."""
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputDirBusy(f"{out} is in use by another run ({_holder(out)}); two runs writing one output_dir "
                            f"corrupt each other's checkpoints and metrics. Wait for it (or stop it: its lock is "
                            f"released when it ends), or choose another train.output_dir") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv)[:500]}
        write_json_atomic(out / HOLDER_FILE, info)  # only the lock's holder writes it
        yield
    finally:
        try:
            (out / HOLDER_FILE).unlink()
        except OSError:
            pass
        lock.release()
