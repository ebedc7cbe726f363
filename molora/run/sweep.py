"""``molora sweep``: equal-budget allocation studies with tuned baselines, one normal ``molora train`` run per cell.

    molora sweep RECIPE.yaml --allocations ▽,□,auto:block-influence,lora,lora-active,base --seeds 0,1,2
                 [--search KEY=V1,V2,... ...] [--search-seeds 0] [--phase search|final|all]
                 [--cells i/N] [--eval-file FILE ...] [--report] [--section.key value ...]

An *arm* is one entry of ``--allocations``; a *cell* is one arm × one seed (× one search setting). Every cell trains
with the recipe as it is (same data, steps, batch, schedule; the same ``--section.key value`` overrides as ``molora
train``) except:

* shapes (presets, block strings) and ``auto:METHOD`` get ``allocation.expert_budget`` = the sweep's budget (the
  recipe's ``expert_budget``, else the total of its own ``num_experts`` on this model), so every mixture has (about)
  the same number of experts;
* ``lora`` is plain LoRA (one expert per layer, kaiming A, whatever mixture levers the recipe sets) whose rank
  matches the mixtures' trainable parameters
  (``round(P_mix / sum(d_in + d_out))``); ``lora-active`` is plain LoRA whose rank equals the mixtures' active rank
  per token (``top_k x r``): the two ways to match a mixture;
* ``base`` is the untuned model: scored once (no training, no seeds) on every split, a row in every table;
* ``ARM@section.key=value@...`` adds overrides to one arm (a lever such as ``▽@allocation.router_init=zeros``);
* ``train.seed`` = the cell's seed, ``train.output_dir`` = ``<output_dir>/sweep/<cell>``.

**Search.** ``--search KEY=V1,V2`` (repeatable; the grid is their product) tunes every trained arm with the same
budget: each arm trains every grid point on ``--search-seeds`` (default: the first seed) in ``sweep/search/``, is
scored on the recipe's evaluation rows (``data.eval_file``: the *validation* split; never a split you report as held
out), and keeps the grid point with the best ``eval.primary_metric`` (ties: the earlier point). The final cells
then train each arm's selected setting over ``--seeds``; score them on held-out data with ``--eval-file``. A final
cell whose seed is a search seed is the search cell of its selected setting (the same run): it is copied, not
trained again. The selection is written to ``sweep/search.json``; a choice on the smallest or largest value of a
numeric axis is flagged there (``at_edge``), in the log and in the summary: the best value may lie outside the grid,
so widen that axis for every arm (listing the new values after the old keeps the finished search cells).

Cells run as ``python -m molora.run.train`` subprocesses, one at a time. Resumable: a cell with ``results.json`` is
skipped; one that was killed is resumed (``--resume latest``). ``--cells i/N`` runs only the cells of the phase with
``index % N == i - 1`` (several processes or machines; ``--phase search`` in all of them first, then ``--phase
final``). ``--eval-file`` scores every finished cell on extra choices-format files with ``molora eval``. At the end
(and with ``--report`` alone) the results are merged into ``sweep/summary.{json,md,png}``
(:mod:`molora.run.sweep_report`).

Over 400 lines because one command runs search and final cells resumably, selects settings and reports; the plan
(arms, cells, budgets) lives in :mod:`molora.run.sweep_plan`, the statistics in :mod:`molora.run.sweep_report` and
:mod:`molora.run.paired_stats`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .recipe import RecipeError, load_recipe, parse_overrides
from .sweep_plan import (BASE_ARM, LORA_ARMS, Arm, Cell, _cell_overrides, _lora_overrides,  # noqa: F401
                         _setting_args, active_rank, budget_and_lora_rank, check_arms, grid_edges, parse_arm,
                         parse_cells_spec, parse_search, plan_cells, plan_search_cells)
from .sweep_report import SweepError, edge_note, summarise, summary_markdown

__all__ = ["main", "plan_cells", "plan_search_cells", "parse_arm", "parse_search", "summarise", "summary_markdown",
           "parse_cells_spec", "SweepError", "Arm", "Cell"]

USAGE = """usage: molora sweep RECIPE.yaml [--allocations A,B,...] [--seeds 0,1,2] [--search KEY=V1,V2 ...]
                    [--search-seeds 0] [--phase search|final|all] [--cells i/N] [--eval-file FILE ...]
                    [--compare A,B] [--restart-changed] [--report] [--section.key VALUE ...]

  --allocations   presets (▽ □ △ ⋈ ◇ or their names), block strings ("2|4|6|8" with | between values, or
                  run-together digits 2468), auto:METHOD, lora (matched parameters), lora-active (matched
                  active rank top_k x r), base (the untuned model); ARM@section.key=value adds overrides to one
                  arm (per-group values with |: ▽@allocation.top_k=1|2|2|2). Every arm is built on the model
                  before the first cell; one more than 10% off the parameter budget is flagged. Default: the
                  study's winner ▽ + levers (@train.router_lr_multiplier=10@allocation.expert_init=orthogonal),
                  MoLA's ▽ (levers off), lora, lora-active and base, and then, unless --search is given,
                  --search train.learning_rate at 0.5, 1 and 2 x the recipe's
  --seeds         comma-separated seeds of the final cells (default: 0)
  --search K=V,.. tune every arm over these values of recipe key K (repeatable: the grid is the product), chosen
                  on the recipe's eval_file by eval.primary_metric, with the same budget for every arm
  --search-seeds  seeds of the search cells (default: the first of --seeds)
  --phase         search, final or all (default): with --cells, run the search in every process first
  --cells i/N     run only cells i, i+N, i+2N, ... (1-based) of the phase
  --eval-file F   also score every final cell (and base) on this choices-format JSONL (repeatable): held-out data
  --compare A,..  also pair every arm with these arms (as written in --allocations); ▽, both LoRAs, the untuned
                  model and the best arm on validation are always references
  --restart-changed  train again the cells whose recorded settings differ from the current ones (an edited
                  recipe or other overrides; without it such a sweep is refused naming the keys)
  --report        only merge the results that exist into sweep/summary.{json,md,png}"""

#: the arms of a sweep without --allocations: the study's winner (▽ with router lr × 10 and orthogonal experts,
#: README "The study", issue 18), MoLA's plain ▽ (levers off explicitly, so a recipe that sets them still gets the
#: MoLA reference), LoRA matched in parameters and in active rank, the untuned model
DEFAULT_ARMS = ("▽@train.router_lr_multiplier=10@allocation.expert_init=orthogonal,"
                "▽@train.router_lr_multiplier=1@allocation.expert_init=kaiming,lora,lora-active,base")
#: the default search (without --allocations and --search): these multiples of the recipe's learning rate
DEFAULT_LR_FACTORS = (0.5, 1.0, 2.0)


def default_search(recipe_path: str, overrides: Sequence[str]) -> list[str]:
    """``--search`` of a sweep without ``--allocations`` and ``--search``: the recipe's learning rate × 0.5, 1, 2,
    chosen on its ``data.eval_file`` (SweepError when it has none: an untuned LoRA is not a baseline)."""
    recipe = load_recipe(recipe_path, parse_overrides(list(overrides)))
    if not recipe.data.eval_file:
        raise SweepError("the default sweep tunes every arm's learning rate on the recipe's data.eval_file, and the "
                         "recipe has none: give data.eval_file (a validation split, e.g. carved with molora split) "
                         "or name the arms with --allocations (and the grid with --search)")
    lr = recipe.train.learning_rate
    return ["train.learning_rate=" + ",".join(f"{lr * f:.3g}" for f in DEFAULT_LR_FACTORS)]


def _run(cmd: list[str], log: Path) -> int:
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), str(root / "kernels"), env.get("PYTHONPATH")) if p)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode


def _eval_cmd(recipe_path: str, overrides: list[str], cell_ov: list[str], adapter: str, target: Path,
              eval_file: Optional[str]) -> list[str]:
    cmd = [sys.executable, "-m", "molora.run.eval_run", recipe_path, *overrides, *cell_ov]
    if eval_file is not None:
        cmd += ["--data.eval_file", str(Path(eval_file).resolve())]
    return cmd + ["--adapter", adapter, "--output", str(target)]


def effective_settings(recipe_path: str, overrides: Sequence[str], cell_ov: Sequence[str], untuned: bool = False
                       ) -> dict[str, Any]:
    """The cell's resolved recipe as flat ``{"section.key": value}``: what its numbers depend on (where it writes,
    how often it saves or logs and how many threads it uses left out: ``resume.OPERATIONAL_KEYS``). The untuned
    model's scores depend on the model, data and eval sections only."""
    from .resume import OPERATIONAL_KEYS, flatten_recipe

    rec = load_recipe(recipe_path, parse_overrides([*overrides, *cell_ov])).model_dump(mode="json")
    return {k: v for k, v in flatten_recipe(rec).items()
            if k not in OPERATIONAL_KEYS and (not untuned or k.split(".", 1)[0] in ("model", "data", "eval"))}


def _check_settings(cell: Cell, cell_dir: Path, settings: dict[str, Any], restart: bool) -> Optional[str]:
    """Compare a cell's recorded settings with the current ones (``cell.json``). A mismatch is refused naming the
    keys that differ, or (``restart``) the cell is started over; returns a note when it was."""
    import shutil

    rec_path = cell_dir / "cell.json"
    if not cell_dir.exists():
        return None
    try:
        old = json.loads(rec_path.read_text(encoding="utf-8"))["settings"]
    except FileNotFoundError:
        old = None
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepError(f"cell {cell.name}: {rec_path} is not readable JSON with a 'settings' object; delete the "
                         f"cell folder {cell_dir} to run it again") from None
    if old is None:
        if any(cell_dir.iterdir()):
            print(f"molora sweep: warning: cell {cell.name} has no record of its settings (made by molora < 0.3); "
                  f"taken as it is", file=sys.stderr, flush=True)
        return None
    from .resume import OPERATIONAL_KEYS, added_at_default

    old = {k: v for k, v in old.items() if k not in OPERATIONAL_KEYS}  # records made before these keys were left out
    keys = sorted(k for k in set(settings) | set(old) if old.get(k, "<absent>") != settings.get(k, "<absent>")
                  and not added_at_default(k, old, settings))
    if not keys:
        return None
    if restart:
        shutil.rmtree(cell_dir)
        return f"started over ({', '.join(keys[:5])} changed)"
    detail = ", ".join(f"{k}: {old.get(k, '<absent>')!r} there, {settings.get(k, '<absent>')!r} now"
                       for k in keys[:5])
    raise SweepError(f"cell {cell.name} in {cell_dir} was run with other settings ({detail}); its results would mix "
                     f"with the new ones in one table. Use another train.output_dir, undo the change, or pass "
                     f"--restart-changed to train the changed cells again")


def _record_settings(cell_dir: Path, settings: dict[str, Any]) -> None:
    from .common import write_json_atomic

    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cell_dir / "cell.json", {"settings": settings})


def _copy_run(src: Path, dst: Path) -> None:
    """Copy a finished run (adapter, results, metrics, predictions, plots; no checkpoints) atomically."""
    import shutil

    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=lambda d, names: [n for n in names if n.startswith("checkpoint-")
                                                       or n.startswith("eval-")])
    shutil.rmtree(dst, ignore_errors=True)
    tmp.replace(dst)


def run_cell(recipe_path: str, cell: Cell, overrides: list[str], budget: int, lora_rank: int, out: Path,
             eval_files: Sequence[str], active: Optional[int] = None, reuse: Optional[Path] = None,
             restart_changed: bool = False) -> str:
    """Train (or resume, or skip) one cell, then score the extra eval files. Returns what happened.

    Every cell records its effective settings (``cell.json``); a cell found with other settings (an edited recipe,
    other overrides) is refused naming the keys, or started over with ``restart_changed``. ``reuse``: a finished
    search cell with this cell's arm, selected setting and seed -- copied instead of trained again (the same run)."""
    cell_dir = out / cell.folder
    log = out / f"{cell.folder}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if cell.allocation == BASE_ARM:  # the untuned model: scored, never trained
        base_ov = ["--train.output_dir", str(cell_dir)]
        settings = effective_settings(recipe_path, overrides, base_ov, untuned=True)
        note = _check_settings(cell, cell_dir, settings, restart_changed)
        _record_settings(cell_dir, settings)
        status = note or "skipped (finished)"
        for ef, target in [(None, cell_dir / "eval-val.json")] + [
                (ef, cell_dir / f"eval-{Path(ef).stem}.json") for ef in eval_files]:
            if target.is_file():
                continue
            status = "scored"
            if _run(_eval_cmd(recipe_path, overrides, base_ov, "none", target, ef), log) != 0:
                raise SweepError(f"{cell.name}: scoring the untuned model failed; see {log}")
        return status
    cell_ov = _cell_overrides(cell, budget, lora_rank, out, active)
    settings = effective_settings(recipe_path, overrides, cell_ov)
    note = _check_settings(cell, cell_dir, settings, restart_changed)
    status = "skipped (finished)"
    if not (cell_dir / "results.json").is_file() and reuse is not None and (reuse / "results.json").is_file():
        _check_settings(cell, reuse, settings, False)  # the search run must be this very configuration
        _copy_run(reuse, cell_dir)  # the same arm, setting and seed already trained in the search: the same run
        status = f"reused {reuse.name} (search cell with this seed and setting)"
    _record_settings(cell_dir, settings)
    if not (cell_dir / "results.json").is_file():
        cmd = [sys.executable, "-m", "molora.run.train", recipe_path, *overrides, *cell_ov]
        if any(p.name != "cell.json" for p in cell_dir.iterdir()):
            cmd += ["--resume", "latest"]
            status = "resumed"
        else:
            status = "trained"
        if note:
            status += f", {note}"
        rc = _run(cmd, log)
        if rc != 0:
            raise SweepError(f"cell {cell.name} failed (exit {rc}); see {log}")
    for ef in eval_files if cell.setting is None else ():  # held-out data: final cells only
        target = cell_dir / f"eval-{Path(ef).stem}.json"
        if target.is_file():
            continue
        rc = _run(_eval_cmd(recipe_path, overrides, cell_ov, str(cell_dir / "adapter"), target, ef), log)
        if rc != 0:
            raise SweepError(f"cell {cell.name}: evaluation on {ef} failed (exit {rc}); see {log}")
    return status


# ------------------------------------------------------------------------------------------------ search


def select_settings(out: Path, search_cells: Sequence[Cell], grid: Sequence[dict[str, str]], primary: str,
                    require_all: bool) -> dict[str, Any]:
    """Per arm, the grid point with the best mean ``primary`` metric on the validation rows of its search cells.

    Returns ``{"grid", "primary", "arms": {slug: {"scores": [mean or None per point], "selected": i,
    "setting": {...}}}, "missing": [cell names]}``; SweepError when ``require_all`` and cells are missing."""
    from .sweep_report import cell_metrics

    key = f"val loglik {primary}"
    scores: dict[str, dict[int, list[float]]] = {}
    missing = []
    for c in search_cells:
        d = out / c.folder
        if not (d / "results.json").is_file():
            missing.append(c.name)
            continue
        v = cell_metrics(d).get(key)
        if v is None:
            raise SweepError(f"search cell {c.name} has no {key!r} (the recipe must score its eval_file by "
                             f"log-likelihood: eval.after and eval.loglik true)")
        scores.setdefault(c.slug, {}).setdefault(c.setting, []).append(v)
    if missing and require_all:
        raise SweepError(f"the search is not finished ({len(missing)} cells missing, e.g. {missing[0]}); run "
                         f"--phase search (in every --cells part) first")
    arms: dict[str, Any] = {}
    for slug, per in scores.items():
        means = [sum(per[g]) / len(per[g]) if g in per else None for g in range(len(grid))]
        best = max((g for g in range(len(grid)) if means[g] is not None), key=lambda g: (means[g], -g))
        arms[slug] = {"scores": means, "selected": best, "setting": grid[best],
                      "at_edge": [{"key": k, "value": v, "edge": e} for k, v, e in grid_edges(grid, best)]}
    return {"grid": list(grid), "primary": key, "arms": arms, "missing": missing}


# ------------------------------------------------------------------------------------------------ command


def _parse(argv: Sequence[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"recipe": None, "allocations": None, "seeds": "0", "cells": None, "eval_files": [],
                            "report": False, "rest": [], "search": [], "search-seeds": None, "phase": "all",
                            "restart-changed": False, "compare": None}
    args, i = list(argv), 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            opts["help"] = True
            i += 1
        elif a == "--report":
            opts["report"] = True
            i += 1
        elif a == "--restart-changed":
            opts["restart-changed"] = True
            i += 1
        elif a in ("--allocations", "--seeds", "--cells", "--eval-file", "--search", "--search-seeds", "--phase",
                   "--compare"):
            if i + 1 >= len(args):
                raise SweepError(f"{a} needs a value")
            if a == "--eval-file":
                opts["eval_files"].append(args[i + 1])
            elif a == "--search":
                opts["search"].append(args[i + 1])
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


def _seeds(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not seeds:
        raise SweepError(f"{flag} is empty")
    return seeds


@dataclass
class _Sweep:
    """What one invocation of ``molora sweep`` plans (checked before any cell runs)."""

    opts: dict[str, Any]
    overrides: list[str]
    seeds: list[int]
    search_seeds: list[int]
    grid: list[dict[str, str]]
    allocations: list[str]
    cells: list[Cell]
    search_cells: list[Cell]
    part: int
    parts: int
    recipe: Any
    active: Optional[int]
    out: Path = Path(".")
    compare: tuple[str, ...] = ()     # slugs of the --compare arms

    def final_cells(self, selection: Optional[dict]) -> list[Cell]:
        return plan_cells(self.allocations, self.seeds,
                          {k: v["setting"] for k, v in (selection or {}).get("arms", {}).items()})


def _prepare(opts: dict[str, Any]) -> _Sweep:
    """The sweep the arguments ask for, every arm's recipe loaded with each search setting (SweepError/RecipeError
    naming what is wrong, before any work)."""
    if opts["recipe"] is None:
        raise SweepError("no recipe given (e.g. molora sweep recipes/csqa_smollm2_cpu.yaml --allocations ▽,□,lora)")
    if opts["allocations"] is not None and not opts["allocations"].strip():
        raise SweepError("--allocations is empty; give arms, e.g. --allocations ▽,□,auto:block-influence,lora, or "
                         "leave it out for the default arms (" + DEFAULT_ARMS + ")")
    if opts["allocations"] is None:
        opts["allocations"] = DEFAULT_ARMS
        if not opts["search"]:
            opts["search"] = default_search(opts["recipe"], opts["rest"])
    if opts["phase"] not in ("search", "final", "all"):
        raise SweepError(f"--phase {opts['phase']!r}; allowed: search, final, all")
    seeds = _seeds(opts["seeds"], "--seeds")
    search_seeds = _seeds(opts["search-seeds"], "--search-seeds") if opts["search-seeds"] else seeds[:1]
    grid = parse_search(opts["search"])
    allocations = opts["allocations"].split(",")
    cells = plan_cells(allocations, seeds)
    search_cells = plan_search_cells(allocations, grid, search_seeds)
    part, parts = parse_cells_spec(opts["cells"])
    phase_cells = search_cells if opts["phase"] == "search" else cells
    if parts > max(1, len(phase_cells)):
        raise SweepError(f"--cells {opts['cells']}: N={parts} is more than the {len(phase_cells)} cells of the "
                         f"{'search' if opts['phase'] == 'search' else 'plan'}")
    for ef in opts["eval_files"]:
        if not Path(ef).is_file():
            raise SweepError(f"--eval-file {ef}: no such file")
    overrides = opts["rest"]
    recipe = load_recipe(opts["recipe"], parse_overrides(overrides))
    trained: dict[str, str] = {}  # what an arm trains (its allocation and resolved recipe) -> the first arm's spec
    for arm in {c.arm.slug: c.arm for c in cells if c.arm is not None}.values():  # every arm's overrides load
        for setting in grid or [{}]:
            try:
                arm_recipe = load_recipe(opts["recipe"], parse_overrides(overrides + arm.override_args()
                                                                         + list(_setting_args(setting))))
            except RecipeError as e:
                raise SweepError(f"arm {arm.spec!r}{f' with search setting {setting}' if setting else ''}: "
                                 f"{e}") from None
        if arm.allocation in LORA_ARMS:  # what a LoRA cell trains: plain LoRA's overrides, then the arm's own
            arm_recipe = load_recipe(opts["recipe"], parse_overrides(overrides + _lora_overrides(1)
                                                                     + arm.override_args()))
        what = json.dumps([arm.allocation, arm_recipe.model_dump(mode="json")], sort_keys=True, default=str)
        if what in trained:
            raise SweepError(f"arms {trained[what]!r} and {arm.spec!r} train the same settings (the recipe already "
                             f"sets what {arm.spec!r} overrides): their cells would be the same runs twice; drop one")
        trained[what] = arm.spec
    if grid and not recipe.data.eval_file:
        raise SweepError("--search selects on the recipe's validation rows: give data.eval_file (a split carved "
                         "from train, never the held-out one)")
    active = active_rank(recipe) if any(c.allocation == "lora-active" for c in cells) else None
    return _Sweep(opts, overrides, seeds, search_seeds, grid, allocations, cells, search_cells, part, parts, recipe,
                  active, Path(recipe.train.output_dir) / "sweep", _compare_slugs(opts["compare"], cells))


def _compare_slugs(text: Optional[str], cells: Sequence[Cell]) -> tuple[str, ...]:
    """``--compare A,B``: the slugs of these arms, each of which must be one of ``--allocations``."""
    if text is None:
        return ()
    slugs = {c.slug: c.arm.spec if c.arm is not None else c.allocation for c in cells}
    out = []
    for spec in (t.strip() for t in text.split(",")):
        if not spec:
            raise SweepError(f"--compare {text!r}: an empty arm; give arms of --allocations separated by commas")
        slug = parse_arm(spec).slug
        if slug not in slugs:
            raise SweepError(f"--compare {spec!r} is not an arm of this sweep; allowed: {', '.join(slugs.values())}")
        out.append(slug)
    return tuple(out)


def _write_plan(sw: _Sweep, budget: int, lora_rank: int, mix_params: int, lora_params: int) -> None:
    """``sweep/plan.json``; a folder holding a sweep with another search grid is refused (cells are numbered by
    their grid point)."""
    from .common import write_json_atomic

    opts = sw.opts
    plan = {"recipe": str(Path(opts["recipe"]).resolve()), "overrides": sw.overrides, "budget": budget,
            "lora_rank": lora_rank, "lora_active_rank": sw.active, "mixture_params": mix_params,
            "lora_params": lora_params, "cells": [c.name for c in sw.cells], "search": opts["search"],
            "search_seeds": sw.search_seeds, "eval_files": [str(Path(e).resolve()) for e in opts["eval_files"]]}
    plan_path = sw.out / "plan.json"
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, ValueError) as e:
            raise SweepError(f"{plan_path} is unreadable ({e}); delete it (each cell keeps its own settings in "
                             f"cell.json and is checked against them) and run the sweep again") from None
        # what each cell computes is checked per cell (cell.json); the grid itself must stay
        diff = [k for k in ("search", "search_seeds") if k in old and old.get(k) != plan.get(k)]
        if diff and not opts["restart-changed"]:
            raise SweepError(f"{sw.out} holds a sweep with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} there, {[plan.get(k) for k in diff]} now); use another "
                             f"train.output_dir")
    write_json_atomic(plan_path, plan)


def _changed_cells(sw: _Sweep, budget: int, lora_rank: int) -> list[str]:
    """Cells already on disk whose recorded settings differ from what they would run now (the final cells of a
    search are checked when their selection is known)."""
    problems = []
    for c in (sw.search_cells if sw.grid else sw.cells):
        if not (sw.out / c.folder).exists():
            continue
        untuned = c.allocation == BASE_ARM
        cell_ov = ["--train.output_dir", str(sw.out / c.folder)] if untuned else _cell_overrides(
            c, budget, lora_rank, sw.out, sw.active)
        try:
            _check_settings(c, sw.out / c.folder, effective_settings(sw.opts["recipe"], sw.overrides, cell_ov,
                                                                    untuned), False)
        except SweepError as e:
            problems.append(str(e))
    return problems


def _run_cells(sw: _Sweep, todo: list[Cell], what: str, eval_files: Sequence[str], budget: int, lora_rank: int,
               selection: Optional[dict], failed: list[str]) -> None:
    """This process's share (``--cells i/N``) of ``todo``, one after the other; a failed cell is recorded in
    ``failed`` and the others still run (re-running the sweep resumes it)."""
    mine = [c for c in todo if c.index % sw.parts == sw.part - 1]
    print(f"molora sweep: {what}: {len(mine)} of {len(todo)} cells here"
          f"{f' (part {sw.part}/{sw.parts})' if sw.parts > 1 else ''}", flush=True)
    for c in mine:
        reuse = None
        if selection is not None and c.seed is not None and c.seed in sw.search_seeds and c.slug in selection["arms"]:
            reuse = sw.out / "search" / f"{c.slug}-g{selection['arms'][c.slug]['selected']}-seed{c.seed}"
        t0 = time.perf_counter()
        try:
            status = run_cell(sw.opts["recipe"], c, sw.overrides, budget, lora_rank, sw.out, eval_files, sw.active,
                              reuse, sw.opts["restart-changed"])
        except SweepError as e:
            print(f"molora sweep: error: {e}", file=sys.stderr, flush=True)
            failed.append(c.name)
            continue
        print(f"molora sweep: {what} cell {c.index + 1}/{len(todo)} {c.name}: {status} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def _select(sw: _Sweep, failed: list[str]) -> Optional[dict]:
    """The search's choice per arm on validation (``search.json``), or None without a search grid."""
    from .common import write_json_atomic

    if not sw.grid:
        return None
    selection = select_settings(sw.out, sw.search_cells, sw.grid, sw.recipe.eval.primary_metric,
                                require_all=sw.opts["phase"] != "search" and not failed)
    if not selection["missing"]:
        write_json_atomic(sw.out / "search.json", selection)
        for slug, s in selection["arms"].items():
            print(f"molora sweep: selected for {slug} on validation ({selection['primary']} "
                  f"{s['scores'][s['selected']]:.3f}): {s['setting']}{edge_note(s)}", flush=True)
    return selection


def _error(e: Exception, code: int = 2) -> int:
    print(f"molora sweep: error: {e}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``molora sweep``: plan, check, run the search phase, select on validation, run the final phase, report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        opts = _parse(argv)
        if opts.get("help"):
            print(USAGE)
            return 0
        sw = _prepare(opts)
    except (SweepError, RecipeError) as e:
        return _error(e)
    sw.out.mkdir(parents=True, exist_ok=True)
    primary = sw.recipe.eval.primary_metric
    if opts["report"]:
        try:
            selection = select_settings(sw.out, sw.search_cells, sw.grid, primary, require_all=False) \
                if sw.grid else None
            print(summary_markdown(summarise(sw.out, sw.final_cells(selection), primary=primary,
                                             selection=selection, compare=sw.compare)))
        except SweepError as e:
            return _error(e)
        return 0
    budget, lora_rank, mix_params, lora_params = budget_and_lora_rank(sw.recipe)
    try:
        for w in check_arms(opts["recipe"], sw.overrides, sw.search_cells if sw.grid else sw.cells, budget,
                            lora_rank, mix_params, sw.out):
            print(f"molora sweep: warning: {w}", file=sys.stderr, flush=True)
        _write_plan(sw, budget, lora_rank, mix_params, lora_params)
    except SweepError as e:
        return _error(e)
    print(f"molora sweep: {len(sw.cells)} final cells, {len(sw.search_cells)} search cells "
          f"({len(sw.grid)} settings per arm); budget {budget} experts (~{mix_params:,} trainable params), lora rank "
          f"{lora_rank} ({lora_params:,}){f', lora-active rank {sw.active}' if sw.active else ''}; output in "
          f"{sw.out}", flush=True)
    if not opts["restart-changed"]:  # cells on disk with other settings are refused before any work
        problems = _changed_cells(sw, budget, lora_rank)
        if problems:
            for p in problems:
                print(f"molora sweep: error: {p}", file=sys.stderr)
            return 2
    failed: list[str] = []
    if sw.grid and opts["phase"] in ("search", "all"):
        _run_cells(sw, sw.search_cells, "search", (), budget, lora_rank, None, failed)
    try:
        selection = _select(sw, failed)
    except SweepError as e:
        return _error(e, 1 if failed else 2)
    final = sw.final_cells(selection)
    if opts["phase"] in ("final", "all") and not (sw.grid and failed):
        _run_cells(sw, final, "final", opts["eval_files"], budget, lora_rank, selection, failed)
    try:
        summary = summarise(sw.out, final, primary=primary, selection=selection, compare=sw.compare)
    except SweepError as e:
        return _error(e)
    print(summary_markdown(summary))
    print(f"molora sweep: wrote {sw.out / 'summary.json'}, {sw.out / 'summary.md'}, {sw.out / 'summary.png'}")
    if failed:
        print(f"molora sweep: {len(failed)} cell(s) failed: {', '.join(failed)}; their logs are beside them; "
              f"run the same command again to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
