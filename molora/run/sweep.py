"""``molora sweep``: equal-budget allocation studies, one normal ``molora train`` run per cell.

    molora sweep RECIPE.yaml --allocations ▽,□,△,⋈,◇,auto:block-influence,lora --seeds 0,1,2
                 [--cells i/N] [--eval-file FILE ...] [--report] [--section.key value ...]

A *cell* is one allocation × one seed. Every cell trains with the recipe as it is (same data, steps, batch,
schedule; the same ``--section.key value`` overrides as ``molora train``) except:

* shapes (presets, block strings) and ``auto:METHOD`` get ``allocation.expert_budget`` = the sweep's budget (the
  recipe's ``expert_budget``, else the total of its own ``num_experts`` on this model), so every mixture has
  (about) the same number of experts; the exact total of each cell is reported;
* ``lora`` is plain LoRA (one expert per layer, top-1) whose rank matches the mixtures' trainable parameters
  (``round(P_mix / sum(d_in + d_out))`` over the targeted projections): the comparison is at equal parameters;
* ``train.seed`` = the cell's seed, ``train.output_dir`` = ``<output_dir>/sweep/<allocation>-seed<seed>``.

Cells run as ``python -m molora.run.train`` subprocesses, one at a time. Resumable: a cell with ``results.json`` is
skipped; one that was killed is resumed (``--resume latest``: from its newest checkpoint, or from scratch when it
died before one). ``--cells i/N`` runs only the cells with ``index % N == i - 1`` (several machines, one output
directory or copies merged later). ``--eval-file`` scores every finished cell on extra choices-format files with
``molora eval``. At the end (and with ``--report`` alone) the results found are merged into
``sweep/summary.json``, ``sweep/summary.md`` and ``sweep/summary.png``: mean ± std and a 95 % t-interval per
allocation and metric, and paired per-seed differences of each allocation against ▽ and against LoRA.

Over 400 lines because one command plans cells, runs them resumably and merges their results into the
statistics table; each part is small and they share the cell naming.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .recipe import Recipe, RecipeError, load_recipe, parse_overrides

__all__ = ["main", "plan_cells", "summarise", "parse_cells_spec", "SweepError"]

USAGE = """usage: molora sweep RECIPE.yaml --allocations A,B,... [--seeds 0,1,2] [--cells i/N] [--eval-file FILE ...]
                    [--report] [--section.key VALUE ...]

  --allocations   presets (▽ □ △ ⋈ ◇ or their names), block strings ("2|4|6|8" with | between values, or
                  run-together digits 2468), auto:METHOD, lora
  --seeds         comma-separated seeds (default: 0)
  --cells i/N     run only cells i, i+N, i+2N, ... (1-based) of the plan
  --eval-file F   also score every cell on this choices-format JSONL (repeatable)
  --report        only merge the results that exist into sweep/summary.{json,md,png}"""

#: t_{0.975, df} for df = 1..30 (two-sided 95 % intervals of a mean over few seeds)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


class SweepError(ValueError):
    """A sweep that cannot start (the message names the value and what is allowed)."""


@dataclass(frozen=True)
class Cell:
    index: int
    allocation: str   # as given
    slug: str         # folder-safe name
    seed: int

    @property
    def name(self) -> str:
        return f"{self.slug}-seed{self.seed}"


# ------------------------------------------------------------------------------------------------ plan


def _slug(alloc: str) -> str:
    from ..allocation.specs import is_auto, preset_name

    if alloc == "lora":
        return "lora"
    if is_auto(alloc):
        return "auto-" + alloc.split(":", 1)[1].strip().lower()
    p = preset_name(alloc)
    if p is not None:
        return p
    return "blocks-" + re.sub(r"[^0-9]+", "-", alloc).strip("-")


def _check_allocation_name(alloc: str) -> str:
    """Canonical form of one ``--allocations`` entry, or SweepError naming it."""
    from ..allocation.methods import get_method
    from ..allocation.specs import auto_method, is_auto, preset_name

    a = alloc.strip()
    if a.lower() == "lora":
        return "lora"
    if is_auto(a):
        try:
            get_method(auto_method(a))
        except ValueError as e:
            raise SweepError(f"--allocations: {a!r}: {e}") from None
        return a
    if preset_name(a) is not None:
        return a
    if re.fullmatch(r"\d+(\|\d+)+|\d{2,}", a):
        return a.replace("|", ",")
    raise SweepError(f"--allocations: unknown allocation {a!r}; allowed: presets (▽ □ △ ⋈ ◇ or inverted_triangle, "
                     f"uniform, triangle, hourglass, diamond), block strings like 2|4|6|8 or 2468, auto:METHOD, lora")


def parse_cells_spec(spec: Optional[str]) -> tuple[int, int]:
    """``"2/4"`` -> (2, 4); None -> (1, 1). SweepError when out of range."""
    if spec is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise SweepError(f"--cells {spec!r}: expected i/N with 1 <= i <= N, e.g. 1/2")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise SweepError(f"--cells {spec!r}: i must be between 1 and N (got i={i}, N={n})")
    return i, n


def plan_cells(allocations: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    cells, seen = [], set()
    for a in allocations:
        canon = _check_allocation_name(a)
        slug = _slug(canon)
        if slug in seen:
            raise SweepError(f"--allocations: {a!r} repeats {slug}")
        seen.add(slug)
        for s in seeds:
            cells.append(Cell(len(cells), canon, slug, int(s)))
    return cells


def _meta_model(recipe: Recipe):
    """The recipe's model with empty (meta) weights where it can be built from a config; shapes only."""
    from .recipe import PACKAGED_MODEL_NAMES

    name = recipe.model.name_or_path
    if name in PACKAGED_MODEL_NAMES:
        from .assets import cache_dir, load_model_and_tokenizer

        load_model_and_tokenizer(name)  # converts once into the cache
        name = str(cache_dir() / "models" / name)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(cfg)


def budget_and_lora_rank(recipe: Recipe) -> tuple[int, int, int, int]:
    """(expert budget, LoRA rank matching the mixtures' trainable parameters, mixture params, LoRA params)."""
    from ..allocation.auto import layer_params
    from ..allocation.specs import resolve_allocation
    from ..allocation.signals import blocks_of

    a = recipe.allocation
    model = _meta_model(recipe)
    _, blocks = blocks_of(model)
    n = len(blocks)
    if a.expert_budget is not None:
        budget = a.expert_budget
        shape = a.num_experts if not isinstance(a.num_experts, str) or not a.num_experts.startswith("auto:") \
            else "uniform"
    else:
        shape = a.num_experts
        if isinstance(shape, str) and shape.startswith("auto:"):
            raise SweepError("the recipe's num_experts is auto:...; give allocation.expert_budget for the sweep")
        budget = sum(x.num_experts for x in resolve_allocation(shape, 1, 1, n))
    experts = [x.num_experts for x in resolve_allocation(shape, 1, 1, n, expert_budget=budget)]
    ranks = a.r if isinstance(a.r, int) else [x.r for x in resolve_allocation(1, 1, a.r, n)]
    targets = a.target_modules if isinstance(a.target_modules, list) else None
    mix = sum(layer_params(model, experts, ranks, targets))
    per_rank = sum(layer_params(model, [1] * n, 1, targets)) - sum(
        layer_params(model, [1] * n, 0, targets))  # sum(d_in + d_out) over the targeted projections
    rank = max(1, round(mix / per_rank))
    lora = rank * per_rank
    return budget, rank, mix, lora


def _cell_overrides(cell: Cell, budget: int, lora_rank: int, out: Path) -> list[str]:
    ov = ["--train.seed", str(cell.seed), "--train.output_dir", str(out / cell.name)]
    if cell.allocation == "lora":
        ov += ["--allocation.num_experts", "1", "--allocation.top_k", "1", "--allocation.r", str(lora_rank),
               "--allocation.lora_alpha", str(2 * lora_rank), "--allocation.expert_budget", "null",
               "--allocation.aux_loss_coef", "0"]
    else:
        ov += ["--allocation.num_experts", json.dumps(cell.allocation), "--allocation.expert_budget", str(budget)]
    return ov


# ------------------------------------------------------------------------------------------------ running


def _run(cmd: list[str], log: Path) -> int:
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), str(root / "kernels"), env.get("PYTHONPATH")) if p)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode


def run_cell(recipe_path: str, cell: Cell, overrides: list[str], budget: int, lora_rank: int, out: Path,
             eval_files: Sequence[str]) -> str:
    """Train (or resume, or skip) one cell, then score the extra eval files. Returns what happened."""
    cell_dir = out / cell.name
    log = out / f"{cell.name}.log"
    status = "skipped (finished)"
    if not (cell_dir / "results.json").is_file():
        cmd = [sys.executable, "-m", "molora.run.train", recipe_path, *overrides,
               *_cell_overrides(cell, budget, lora_rank, out)]
        if cell_dir.exists():
            cmd += ["--resume", "latest"]
            status = "resumed"
        else:
            status = "trained"
        rc = _run(cmd, log)
        if rc != 0:
            raise SweepError(f"cell {cell.name} failed (exit {rc}); see {log}")
    for ef in eval_files:
        target = cell_dir / f"eval-{Path(ef).stem}.json"
        if target.is_file():
            continue
        cmd = [sys.executable, "-m", "molora.run.eval_run", recipe_path, *overrides,
               *_cell_overrides(cell, budget, lora_rank, out), "--data.eval_file", str(Path(ef).resolve()),
               "--adapter", str(cell_dir / "adapter"), "--output", str(target)]
        rc = _run(cmd, log)
        if rc != 0:
            raise SweepError(f"cell {cell.name}: evaluation on {ef} failed (exit {rc}); see {log}")
    return status


# ------------------------------------------------------------------------------------------------ report


def _ci(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, std, half-width of the 95 % t-interval); std and interval are nan for one value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = statistics.stdev(values)
    t = _T975[min(n - 1, len(_T975)) - 1]
    return mean, sd, t * sd / math.sqrt(n)


def _cell_metrics(cell_dir: Path) -> dict[str, float]:
    res = json.loads((cell_dir / "results.json").read_text(encoding="utf-8"))
    out: dict[str, float] = {}
    for kind, v in (res.get("accuracy", {}).get("after") or {}).items():
        out[f"val {kind}"] = v["accuracy"]
    for f in sorted(cell_dir.glob("eval-*.json")):
        rec = json.loads(f.read_text(encoding="utf-8"))
        for kind, v in rec.get("accuracy", {}).items():
            out[f"{f.stem[5:]} {kind}"] = v["accuracy"]
    try:
        from .telemetry import read_metrics

        run = next(r for r in read_metrics(cell_dir / "metrics.jsonl") if r.get("type") == "run")
        out["trainable params"] = run.get("trainable_params")
        # per layer; a layer whose attention and MLP have their own counts counts their mean (as the budget does)
        out["experts"] = sum((x["num_experts"] + x["num_experts_mlp"]) / 2 if x.get("num_experts_mlp") is not None
                             else x["num_experts"] for x in run.get("allocation") or [])
    except (OSError, StopIteration, ValueError):
        pass
    return out


def summarise(out: Path, cells: Sequence[Cell]) -> dict[str, Any]:
    """Merge the finished cells' results (see the module doc) and write summary.{json,md,png}."""
    by_alloc: dict[str, dict[int, dict[str, float]]] = {}
    for c in cells:
        d = out / c.name
        if (d / "results.json").is_file():
            by_alloc.setdefault(c.slug, {})[c.seed] = _cell_metrics(d)
    metrics = sorted({k for runs in by_alloc.values() for r in runs.values() for k in r
                      if k not in ("trainable params", "experts")})
    rows = []
    for slug, runs in by_alloc.items():
        row: dict[str, Any] = {"allocation": slug, "seeds": sorted(runs)}
        for m in metrics + ["trainable params", "experts"]:
            vals = [r[m] for r in runs.values() if r.get(m) is not None]
            if vals:
                mean, sd, half = _ci(vals)
                row[m] = {"mean": mean, "std": sd, "ci95": half, "n": len(vals), "values": vals}
        rows.append(row)
    paired = {}
    for ref in ("inverted_triangle", "lora"):
        if ref not in by_alloc:
            continue
        for slug, runs in by_alloc.items():
            if slug == ref:
                continue
            for m in metrics:
                seeds = [s for s in runs if s in by_alloc[ref] and m in runs[s] and m in by_alloc[ref][s]]
                if not seeds:
                    continue
                diffs = [runs[s][m] - by_alloc[ref][s][m] for s in seeds]
                mean, sd, half = _ci(diffs)
                paired.setdefault(f"vs {ref}", []).append(
                    {"allocation": slug, "metric": m, "seeds": seeds, "diff_mean": mean, "diff_ci95": half,
                     "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)})
    summary = {"cells_done": sum(len(r) for r in by_alloc.values()), "cells_planned": len(cells),
               "metrics": metrics, "rows": rows, "paired": paired}
    from .common import write_json_atomic as _write_json_atomic

    _write_json_atomic(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    _plot(summary, out / "summary.png")
    return summary


def _fmt(cell: Optional[dict]) -> str:
    if not cell:
        return "-"
    if cell["n"] < 2:
        return f"{cell['mean']:.3f} (n=1)"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f} [±{cell['ci95']:.3f}]"


def summary_markdown(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    head = "| allocation | seeds | " + " | ".join(metrics) + " | experts | trainable params |"
    lines = [f"{summary['cells_done']} of {summary['cells_planned']} cells finished. Accuracy mean ± std over "
             f"seeds [95 % t-interval half-width].", "", head, "|" + "---|" * (len(metrics) + 4)]
    for row in summary["rows"]:
        params, experts = row.get("trainable params"), row.get("experts")
        cells = [row["allocation"], str(len(row["seeds"]))] + [_fmt(row.get(m)) for m in metrics]
        cells.append(f"{experts['mean']:.0f}" if experts else "-")
        cells.append(f"{params['mean']:,.0f}" if params else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for ref, items in summary["paired"].items():
        lines += ["", f"Paired per seed, {ref} (difference of means [95 % t-interval half-width], wins/losses):", ""]
        for it in items:
            half = "n/a" if math.isnan(it["diff_ci95"]) else f"±{it['diff_ci95']:.3f}"
            lines.append(f"- {it['allocation']}, {it['metric']}: {it['diff_mean']:+.3f} [{half}], "
                         f"{it['wins']}/{it['losses']} over seeds {it['seeds']}")
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return
    metrics = summary["metrics"]
    rows = summary["rows"]
    if not rows or not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        names = [r["allocation"] for r in rows if m in r]
        means = [r[m]["mean"] for r in rows if m in r]
        errs = [0.0 if math.isnan(r[m]["ci95"]) else r[m]["ci95"] for r in rows if m in r]
        ax.bar(range(len(names)), means, yerr=errs, capsize=4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_title(m)
        ax.set_ylabel("accuracy (95 % CI)")
    fig.tight_layout()
    from .report import save_figure

    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ command


def _parse(argv: Sequence[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"recipe": None, "allocations": None, "seeds": "0", "cells": None, "eval_files": [],
                            "report": False, "rest": []}
    args, i = list(argv), 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            opts["help"] = True
            i += 1
        elif a == "--report":
            opts["report"] = True
            i += 1
        elif a in ("--allocations", "--seeds", "--cells", "--eval-file"):
            if i + 1 >= len(args):
                raise SweepError(f"{a} needs a value")
            if a == "--eval-file":
                opts["eval_files"].append(args[i + 1])
            else:
                opts[a[2:]] = args[i + 1]
            i += 2
        elif not a.startswith("--") and opts["recipe"] is None:
            opts["recipe"] = a
            i += 1
        else:
            opts["rest"].append(a)
            i += 1
    return opts


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        opts = _parse(argv)
        if opts.get("help"):
            print(USAGE)
            return 0
        if opts["recipe"] is None:
            raise SweepError("no recipe given (e.g. molora sweep recipes/csqa_smollm2_cpu.yaml --allocations ▽,□,lora)")
        if not opts["allocations"]:
            raise SweepError("--allocations is required, e.g. --allocations ▽,□,auto:block-influence,lora")
        try:
            seeds = [int(s) for s in opts["seeds"].split(",") if s.strip()]
        except ValueError:
            raise SweepError(f"--seeds {opts['seeds']!r}: expected comma-separated integers") from None
        if not seeds:
            raise SweepError("--seeds is empty")
        cells = plan_cells(opts["allocations"].split(","), seeds)
        part, parts = parse_cells_spec(opts["cells"])
        if parts > len(cells):
            raise SweepError(f"--cells {opts['cells']}: N={parts} is more than the {len(cells)} cells of the plan")
        for ef in opts["eval_files"]:
            if not Path(ef).is_file():
                raise SweepError(f"--eval-file {ef}: no such file")
        overrides = opts["rest"]
        recipe = load_recipe(opts["recipe"], parse_overrides(overrides))
    except (SweepError, RecipeError) as e:
        print(f"molora sweep: error: {e}", file=sys.stderr)
        return 2
    out = Path(recipe.train.output_dir) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    if opts["report"]:
        summary = summarise(out, cells)
        print(summary_markdown(summary))
        return 0
    budget, lora_rank, mix_params, lora_params = budget_and_lora_rank(recipe)
    plan = {"recipe": str(Path(opts["recipe"]).resolve()), "overrides": overrides, "budget": budget,
            "lora_rank": lora_rank, "mixture_params": mix_params, "lora_params": lora_params,
            "cells": [c.name for c in cells], "eval_files": [str(Path(e).resolve()) for e in opts["eval_files"]]}
    plan_path = out / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text(encoding="utf-8"))
        diff = [k for k in ("overrides", "budget", "lora_rank") if old.get(k) != plan.get(k)]
        if diff:
            print(f"molora sweep: error: {out} holds a sweep with other settings ({', '.join(diff)}: "
                  f"{[old.get(k) for k in diff]} there, {[plan.get(k) for k in diff]} now); use another "
                  f"train.output_dir", file=sys.stderr)
            return 2
    from .common import write_json_atomic as _write_json_atomic

    _write_json_atomic(plan_path, plan)
    mine = [c for c in cells if c.index % parts == part - 1]
    print(f"molora sweep: {len(cells)} cells ({len(mine)} here{f', part {part}/{parts}' if parts > 1 else ''}); "
          f"budget {budget} experts (~{mix_params:,} trainable params), lora rank {lora_rank} "
          f"({lora_params:,}); output in {out}", flush=True)
    failed = []
    for c in mine:
        t0 = time.perf_counter()
        try:
            status = run_cell(opts["recipe"], c, overrides, budget, lora_rank, out, opts["eval_files"])
        except SweepError as e:  # the other cells still run; re-running the sweep resumes this one
            print(f"molora sweep: error: {e}", file=sys.stderr, flush=True)
            failed.append(c.name)
            continue
        print(f"molora sweep: cell {c.index + 1}/{len(cells)} {c.name}: {status} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarise(out, cells)
    print(summary_markdown(summary))
    print(f"molora sweep: wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'summary.png'}")
    if failed:
        print(f"molora sweep: {len(failed)} cell(s) failed: {', '.join(failed)}; their logs are beside them; "
              f"run the same command again to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
