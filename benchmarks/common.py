"""Shared helpers of the molora benchmarks: side-by-side timing, environment record, JSON + PNG output.

How we time (docs/design.md §5): the machines are shared and noisy, so every variant of one measurement
point is timed in the same run, alternated A B C A B C ..., after a warm-up, many repetitions, and
reported by its median; conclusions come from ratios between variants of the same point, never from
a lone absolute time. On CUDA each call is bracketed by ``torch.cuda.synchronize`` (events would hide
host overhead that a real step pays too).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    variants: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    reps: int = 10,
    min_time: float = 0.0,
    max_reps: Optional[int] = None,
    device: torch.device | str | None = None,
    setup: Optional[Callable[[], None]] = None,
) -> dict[str, dict[str, float]]:
    """Time several variants side by side, alternated A B C A B C ...

    Args:
        variants: name -> zero-argument callable (one measured call each).
        warmup: untimed rounds over all variants first.
        reps: at least this many timed rounds.
        min_time: keep adding rounds (up to ``max_reps``) until the slowest variant's total timed
            time reaches this many seconds.
        device: synchronize this CUDA device around each call (ignored on CPU).
        setup: called (untimed) before every call, e.g. to drop gradients.
    Returns:
        name -> {"median", "min", "mean", "iqr", "n"} in seconds.
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            if setup is not None:
                setup()
            variants[n]()
    _sync(device)
    rounds = 0
    cap = max_reps if max_reps is not None else max(reps, 10_000)
    while True:
        # rotate the starting variant so that none always runs right after the same other one
        order = names[rounds % len(names):] + names[: rounds % len(names)]
        for n in order:
            if setup is not None:
                setup()
            _sync(device)
            t0 = time.perf_counter()
            variants[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
        rounds += 1
        if rounds >= reps and (rounds >= cap or max(sum(v) for v in times.values()) >= min_time):
            break
    return {n: summarize(v) for n, v in times.items()}


def ratio_results(timing: Mapping[str, Mapping[str, float]], reference: str, tokens: int,
                  rate_key: str = "tokens_per_s") -> list[dict[str, Any]]:
    """One result row per variant of :func:`time_alternating`'s output: ``variant``, ``median_s``, ``iqr_s``,
    ``rate_key`` (``tokens`` per median second) and ``ratio_to_lora`` (median / the ``reference`` variant's)."""
    ref = timing[reference]["median"]
    return [{"variant": name, "median_s": t["median"], "iqr_s": t["iqr"], rate_key: tokens / t["median"],
             "ratio_to_lora": t["median"] / ref} for name, t in timing.items()]


def summarize(samples: Sequence[float]) -> dict[str, float]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "mean": statistics.fmean(s), "iqr": q[2] - q[0],
            "n": float(len(s))}


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import peft
        env["peft"] = peft.__version__
    except Exception:  # pragma: no cover - optional
        env["peft"] = None
    try:
        import triton  # noqa: F401
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


RESULTS = Path(__file__).resolve().parent / "results"


def add_output_args(parser, name: str) -> None:
    """``--out DIR`` and ``--publish``: a run writes into its own folder (``runs/bench/<name>-<time>``) unless told
    otherwise; ``--publish`` writes the figures the README shows (``benchmarks/results/``), an explicit step."""
    parser.add_argument("--out", default=None, help="folder for the JSON and PNG (default: runs/bench/<name>-<time>)")
    parser.add_argument("--publish", action="store_true",
                        help="write into benchmarks/results/ (the figures the README shows) instead")
    parser.set_defaults(_bench_name=name)


def output_dir(args) -> Path:
    """Where a benchmark run writes (see :func:`add_output_args`)."""
    if args.out is not None and args.publish:
        raise SystemExit("--out and --publish are exclusive")
    if getattr(args, "_resolved_out", None) is None:  # one folder per run, however often it is asked
        args._resolved_out = (RESULTS if args.publish else Path(args.out) if args.out is not None else
                              Path("runs") / "bench" / f"{args._bench_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args._resolved_out


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as JSON atomically (a temp file beside it, then rename): never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def plot_ratio_bars(path: str | os.PathLike, groups: Sequence[str], series: Mapping[str, Sequence[float]], *,
                    title: str, ylabel: str, hline: Optional[float] = 1.0, log: bool = False) -> Optional[Path]:
    """Grouped bar chart (one group per measurement point, one bar per variant) with the Agg backend.

    Returns the written path, or None when matplotlib is missing (the JSON is the record).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(series)
    n_groups, n_series = len(groups), max(1, len(names))
    width = 0.8 / n_series
    fig_w = min(40.0, max(8.0, 0.55 * n_groups * max(1.0, n_series / 3)))
    fig, ax = plt.subplots(figsize=(fig_w, 5.0))
    # one colour per variant (tab10 up to 10, tab20 up to 20, then hatches): the default cycle repeats after 10
    palette = plt.get_cmap("tab10" if n_series <= 10 else "tab20").colors
    hatches = ["", "//", "..", "xx"]
    for i, name in enumerate(names):
        xs = [g + (i - (n_series - 1) / 2) * width for g in range(n_groups)]
        vals = [float("nan") if v is None else v for v in series[name]]
        ax.bar(xs, vals, width=width, label=name, color=palette[i % len(palette)],
               hatch=hatches[(i // len(palette)) % len(hatches)], edgecolor="white" if i < len(palette) else "black",
               linewidth=0.3)
    if hline is not None:
        ax.axhline(hline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(n_groups))
    ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=min(4, n_series))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain fixed-width table (floats with 2 decimals)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(out)
