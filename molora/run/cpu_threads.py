"""How many CPU threads a run computes with, and the warning when steps slow down (a shared machine).

PyTorch starts as many intra-op threads as the machine has cores. When other work shares those cores (a second
run, a test suite, a browser) the threads wait on each other and a step can take 20-40x as long; one thread per
free core is then much faster. molora's default: ``OMP_NUM_THREADS`` when it is set, else the cores this process may
run on (``os.sched_getaffinity``: a container's or ``taskset``'s limit, not the host's count) divided by the ranks
that share this machine (``LOCAL_WORLD_SIZE`` under the DeepSpeed/torchrun launchers). ``train.threads`` sets it
explicitly. GPU runs are not affected (the threads only run host-side work there).

During training the seconds per step of each logging interval are compared with the first intervals (the
calibration); when a step takes more than ``SLOW_FACTOR`` times as long, one warning names the setting to change.
"""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["available_cores", "default_threads", "configure_threads", "SlowStepWatch", "SLOW_FACTOR"]

SLOW_FACTOR = 3.0


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), or os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = (os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1").strip()
    ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, available_cores() // ranks)


def configure_threads(requested: Optional[int]) -> tuple[int, str]:
    """Set torch's intra-op threads; returns (threads, where the number came from)."""
    import torch

    if requested is not None:
        n, why = requested, "train.threads"
    else:
        n = default_threads()
        why = "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() else (
            f"{available_cores()} cores available" + (f" / {os.environ['LOCAL_WORLD_SIZE']} ranks"
                                                      if os.environ.get("LOCAL_WORLD_SIZE", "1") != "1" else ""))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n, why


class SlowStepWatch:
    """Feeds on (steps, seconds) per logging interval; returns a warning once when steps slow down."""

    def __init__(self, threads: int, factor: float = SLOW_FACTOR, calibration_intervals: int = 2):
        self.threads = threads
        self.factor = factor
        self.calibration_intervals = calibration_intervals
        self._calib: list[float] = []
        self.warned = False

    @property
    def calibration(self) -> Optional[float]:
        return min(self._calib) if len(self._calib) >= self.calibration_intervals else None

    def observe(self, steps: int, seconds: float) -> Optional[str]:
        if steps <= 0 or seconds <= 0:
            return None
        per_step = seconds / steps
        if len(self._calib) < self.calibration_intervals:
            self._calib.append(per_step)
            return None
        base = self.calibration
        if self.warned or base is None or per_step <= self.factor * base:
            return None
        self.warned = True
        lower = max(1, self.threads // 2)
        return (f"steps now take {per_step:.1f} s, {per_step / base:.1f}x the {base:.1f} s of the first steps: the CPU "
                f"is probably shared with other work, and {self.threads} threads wait on each other. Fewer threads "
                f"are usually faster then: --train.threads {lower} (or OMP_NUM_THREADS={lower}); the run goes on")
