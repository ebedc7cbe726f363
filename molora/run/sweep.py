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
* ``lora`` is plain LoRA (one expert per layer) whose rank matches the mixtures' trainable parameters
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
trained again. The selection is written to ``sweep/search.json``.

Cells run as ``python -m molora.run.train`` subprocesses, one at a time. Resumable: a cell with ``results.json`` is
skipped; one that was killed is resumed (``--resume latest``). ``--cells i/N`` runs only the cells of the phase with
``index % N == i - 1`` (several processes or machines; ``--phase search`` in all of them first, then ``--phase
final``). ``--eval-file`` scores every finished cell on extra choices-format files with ``molora eval``. At the end
(and with ``--report`` alone) the results are merged into ``sweep/summary.{json,md,png}``
(:mod:`molora.run.sweep_report`).

Over 400 lines because one command plans arms, search and final cells, runs them resumably and selects settings;
the statistics live in :mod:`molora.run.sweep_report` and :mod:`molora.run.paired_stats`.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .recipe import Recipe, RecipeError, load_recipe, parse_overrides
from .sweep_report import SweepError, summarise, summary_markdown

__all__ = ["main", "plan_cells", "plan_search_cells", "parse_arm", "parse_search", "summarise", "summary_markdown",
           "parse_cells_spec", "SweepError", "Arm", "Cell"]

USAGE = """usage: molora sweep RECIPE.yaml --allocations A,B,... [--seeds 0,1,2] [--search KEY=V1,V2 ...]
                    [--search-seeds 0] [--phase search|final|all] [--cells i/N] [--eval-file FILE ...]
                    [--restart-changed] [--report] [--section.key VALUE ...]

  --allocations   presets (▽ □ △ ⋈ ◇ or their names), block strings ("2|4|6|8" with | between values, or
                  run-together digits 2468), auto:METHOD, lora (matched parameters), lora-active (matched
                  active rank top_k x r), base (the untuned model); ARM@section.key=value adds overrides to one arm
  --seeds         comma-separated seeds of the final cells (default: 0)
  --search K=V,.. tune every arm over these values of recipe key K (repeatable: the grid is the product), chosen
                  on the recipe's eval_file by eval.primary_metric, with the same budget for every arm
  --search-seeds  seeds of the search cells (default: the first of --seeds)
  --phase         search, final or all (default): with --cells, run the search in every process first
  --cells i/N     run only cells i, i+N, i+2N, ... (1-based) of the phase
  --eval-file F   also score every final cell (and base) on this choices-format JSONL (repeatable): held-out data
  --restart-changed  train again the cells whose recorded settings differ from the current ones (an edited
                  recipe or other overrides; without it such a sweep is refused naming the keys)
  --report        only merge the results that exist into sweep/summary.{json,md,png}"""

#: arms that are not mixtures of the sweep's budget
LORA_ARMS = ("lora", "lora-active")
BASE_ARM = "base"


@dataclass(frozen=True)
class Arm:
    """One entry of ``--allocations``: an allocation and the recipe overrides of this arm alone."""

    spec: str                                   # as given
    allocation: str                             # canonical: preset, blocks, auto:M, lora, lora-active, base
    overrides: tuple[tuple[str, str], ...] = ()  # (section.key, raw value)
    slug: str = ""                              # folder-safe name

    def override_args(self) -> list[str]:
        return [a for k, v in self.overrides for a in (f"--{k}", v)]


@dataclass(frozen=True)
class Cell:
    index: int
    allocation: str   # the arm's canonical allocation
    slug: str         # the arm's folder-safe name
    seed: Optional[int]                                  # None: the untuned model (seed-independent)
    arm: Optional[Arm] = field(default=None, compare=False)
    setting: Optional[int] = None                        # search grid point, None for final cells
    extra: tuple[str, ...] = ()                          # CLI overrides of the grid point / selected setting

    @property
    def name(self) -> str:
        if self.seed is None:
            return self.slug
        g = f"-g{self.setting}" if self.setting is not None else ""
        return f"{self.slug}{g}-seed{self.seed}"

    @property
    def folder(self) -> str:
        return f"search/{self.name}" if self.setting is not None else self.name


# ------------------------------------------------------------------------------------------------ plan


def _slug(alloc: str) -> str:
    from ..allocation.specs import is_auto, preset_name

    if alloc in LORA_ARMS or alloc == BASE_ARM:
        return alloc
    if is_auto(alloc):
        return "auto-" + alloc.split(":", 1)[1].strip().lower()
    p = preset_name(alloc)
    if p is not None:
        return p
    return "blocks-" + re.sub(r"[^0-9]+", "-", alloc).strip("-")


def _check_allocation_name(alloc: str) -> str:
    """Canonical form of one ``--allocations`` entry's allocation, or SweepError naming it."""
    from ..allocation.methods import get_method
    from ..allocation.specs import auto_method, is_auto, preset_name

    a = alloc.strip()
    if a.lower() in LORA_ARMS or a.lower() == BASE_ARM:
        return a.lower()
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
                     f"uniform, triangle, hourglass, diamond), block strings like 2|4|6|8 or 2468, auto:METHOD, lora, "
                     f"lora-active, base")


def _split_assignment(text: str, where: str) -> tuple[str, str]:
    if "=" not in text:
        raise SweepError(f"{where}: {text!r} is not section.key=value (e.g. allocation.router_init=zeros)")
    key, value = (t.strip() for t in text.split("=", 1))
    if not re.fullmatch(r"[a-z_]+\.[A-Za-z0-9_]+", key):
        raise SweepError(f"{where}: {key!r} is not a recipe key section.key (e.g. train.learning_rate)")
    if value == "":
        raise SweepError(f"{where}: {key} has no value")
    return key, value


def parse_arm(spec: str) -> Arm:
    """``"▽@allocation.router_init=zeros@train.learning_rate=1e-3"`` -> an :class:`Arm`."""
    head, *assigns = spec.strip().split("@")
    alloc = _check_allocation_name(head)
    overrides = tuple(_split_assignment(a, f"--allocations {spec!r}") for a in assigns)
    if alloc == BASE_ARM and overrides:
        raise SweepError(f"--allocations {spec!r}: base is the untuned model; it takes no overrides")
    slug = _slug(alloc)
    for k, v in overrides:
        slug += "-" + re.sub(r"[^A-Za-z0-9._]+", "", k.split(".", 1)[1]) + re.sub(r"[^A-Za-z0-9.+-]+", "", v)
    return Arm(spec.strip(), alloc, overrides, slug)


def parse_search(items: Sequence[str]) -> list[dict[str, str]]:
    """``["train.learning_rate=1e-4,3e-4", "allocation.top_k=1,2"]`` -> the grid (list of {key: raw value})."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, values = _split_assignment(item, "--search")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise SweepError(f"--search {item!r}: no values")
        if len(set(vals)) != len(vals):
            raise SweepError(f"--search {item!r}: a value repeats")
        if key in (k for k, _ in axes):
            raise SweepError(f"--search: {key} is given twice; list all its values in one --search")
        if key in ("train.seed", "train.output_dir"):
            raise SweepError(f"--search: {key} is set by the sweep itself; tune other keys")
        axes.append((key, vals))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])] \
        if axes else []


def _setting_args(setting: dict[str, str]) -> tuple[str, ...]:
    return tuple(a for k, v in setting.items() for a in (f"--{k}", v))


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


def _arms(allocations: Sequence[str]) -> list[Arm]:
    arms, seen = [], set()
    for a in allocations:
        arm = parse_arm(a)
        if arm.slug in seen:
            raise SweepError(f"--allocations: {a!r} repeats {arm.slug}")
        seen.add(arm.slug)
        arms.append(arm)
    return arms


def plan_cells(allocations: Sequence[str], seeds: Sequence[int],
               selected: Optional[dict[str, dict[str, str]]] = None) -> list[Cell]:
    """The final cells: every arm × seed (``base`` once), each with its arm's selected search setting."""
    cells: list[Cell] = []
    for arm in _arms(allocations):
        if arm.allocation == BASE_ARM:
            cells.append(Cell(len(cells), arm.allocation, arm.slug, None, arm))
            continue
        extra = _setting_args((selected or {}).get(arm.slug) or {})
        for s in seeds:
            cells.append(Cell(len(cells), arm.allocation, arm.slug, int(s), arm, None, extra))
    return cells


def plan_search_cells(allocations: Sequence[str], grid: Sequence[dict[str, str]], seeds: Sequence[int]) -> list[Cell]:
    """The search cells: every trained arm × grid point × search seed (the same budget for every arm)."""
    cells: list[Cell] = []
    for arm in _arms(allocations):
        if arm.allocation == BASE_ARM:
            continue
        for g, setting in enumerate(grid):
            for s in seeds:
                cells.append(Cell(len(cells), arm.allocation, arm.slug, int(s), arm, g, _setting_args(setting)))
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
    shared = getattr(a, "shared_expert_r", 0) or 0
    mix += shared * per_rank  # an always-on shared expert of rank s is a rank-s LoRA beside the routed experts
    rank = max(1, round(mix / per_rank))
    lora = rank * per_rank
    return budget, rank, mix, lora


def active_rank(recipe: Recipe) -> int:
    """Rank of one LoRA with the mixtures' active rank per token: top_k x r (+ the shared expert's rank)."""
    a = recipe.allocation
    if not (isinstance(a.top_k, int) and isinstance(a.r, int)):
        raise SweepError(f"lora-active needs one top_k and one r for all layers (got top_k={a.top_k!r}, r={a.r!r}); "
                         f"give them as ints or drop lora-active")
    return a.top_k * a.r + (getattr(a, "shared_expert_r", 0) or 0)


def _lora_overrides(rank: int) -> list[str]:
    return ["--allocation.num_experts", "1", "--allocation.top_k", "1", "--allocation.r", str(rank),
            "--allocation.lora_alpha", str(2 * rank), "--allocation.expert_budget", "null",
            "--allocation.num_experts_mlp", "null", "--allocation.aux_loss_coef", "0",
            "--allocation.shared_expert_r", "0"]


def _cell_overrides(cell: Cell, budget: int, lora_rank: int, out: Path, active: Optional[int] = None) -> list[str]:
    ov = ["--train.seed", str(cell.seed), "--train.output_dir", str(out / cell.folder)]
    if cell.allocation == "lora":
        ov += _lora_overrides(lora_rank)
    elif cell.allocation == "lora-active":
        ov += _lora_overrides(active if active is not None else lora_rank)
    else:
        ov += ["--allocation.num_experts", json.dumps(cell.allocation), "--allocation.expert_budget", str(budget)]
    if cell.arm is not None:
        ov += cell.arm.override_args()
    return ov + list(cell.extra)


# ------------------------------------------------------------------------------------------------ running


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
    from .resume import OPERATIONAL_KEYS

    old = {k: v for k, v in old.items() if k not in OPERATIONAL_KEYS}  # records made before these keys were left out
    if old == settings:
        return None
    keys = sorted(k for k in set(settings) | set(old) if old.get(k, "<absent>") != settings.get(k, "<absent>"))
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
        arms[slug] = {"scores": means, "selected": best, "setting": grid[best]}
    return {"grid": list(grid), "primary": key, "arms": arms, "missing": missing}


# ------------------------------------------------------------------------------------------------ command


def _parse(argv: Sequence[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"recipe": None, "allocations": None, "seeds": "0", "cells": None, "eval_files": [],
                            "report": False, "rest": [], "search": [], "search-seeds": None, "phase": "all",
                            "restart-changed": False}
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
        elif a in ("--allocations", "--seeds", "--cells", "--eval-file", "--search", "--search-seeds", "--phase"):
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
        for arm in {c.arm.slug: c.arm for c in cells if c.arm is not None}.values():  # every arm's overrides load
            for setting in grid or [{}]:
                try:
                    load_recipe(opts["recipe"], parse_overrides(overrides + arm.override_args()
                                                                + list(_setting_args(setting))))
                except RecipeError as e:
                    raise SweepError(f"arm {arm.spec!r}{f' with search setting {setting}' if setting else ''}: "
                                     f"{e}") from None
        if grid and not recipe.data.eval_file:
            raise SweepError("--search selects on the recipe's validation rows: give data.eval_file (a split carved "
                             "from train, never the held-out one)")
        active = active_rank(recipe) if any(c.allocation == "lora-active" for c in cells) else None
    except (SweepError, RecipeError) as e:
        print(f"molora sweep: error: {e}", file=sys.stderr)
        return 2
    out = Path(recipe.train.output_dir) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    primary = recipe.eval.primary_metric
    if opts["report"]:
        try:
            selection = select_settings(out, search_cells, grid, primary, require_all=False) if grid else None
            final = plan_cells(allocations, seeds,
                               {k: v["setting"] for k, v in (selection or {}).get("arms", {}).items()})
            summary = summarise(out, final, primary=primary, selection=selection)
        except SweepError as e:
            print(f"molora sweep: error: {e}", file=sys.stderr)
            return 2
        print(summary_markdown(summary))
        return 0
    budget, lora_rank, mix_params, lora_params = budget_and_lora_rank(recipe)
    plan = {"recipe": str(Path(opts["recipe"]).resolve()), "overrides": overrides, "budget": budget,
            "lora_rank": lora_rank, "lora_active_rank": active, "mixture_params": mix_params,
            "lora_params": lora_params, "cells": [c.name for c in cells], "search": opts["search"],
            "search_seeds": search_seeds, "eval_files": [str(Path(e).resolve()) for e in opts["eval_files"]]}
    plan_path = out / "plan.json"
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, ValueError) as e:
            print(f"molora sweep: error: {plan_path} is unreadable ({e}); delete it (each cell keeps its own "
                  f"settings in cell.json and is checked against them) and run the sweep again", file=sys.stderr)
            return 2
        # what each cell computes is checked per cell (cell.json); the grid itself must stay (cells are numbered
        # by their grid point)
        diff = [k for k in ("search", "search_seeds") if k in old and old.get(k) != plan.get(k)]
        if diff and not opts["restart-changed"]:
            print(f"molora sweep: error: {out} holds a sweep with other settings ({', '.join(diff)}: "
                  f"{[old.get(k) for k in diff]} there, {[plan.get(k) for k in diff]} now); use another "
                  f"train.output_dir", file=sys.stderr)
            return 2
    from .common import write_json_atomic as _write_json_atomic

    _write_json_atomic(plan_path, plan)
    print(f"molora sweep: {len(cells)} final cells, {len(search_cells)} search cells "
          f"({len(grid)} settings per arm); budget {budget} experts (~{mix_params:,} trainable params), lora rank "
          f"{lora_rank} ({lora_params:,}){f', lora-active rank {active}' if active else ''}; output in {out}",
          flush=True)
    failed: list[str] = []

    def reuse_for(c: Cell) -> Optional[Path]:
        if selection is None or c.seed is None or c.seed not in search_seeds or c.slug not in selection["arms"]:
            return None
        return out / "search" / f"{c.slug}-g{selection['arms'][c.slug]['selected']}-seed{c.seed}"

    def run_all(todo: list[Cell], total: int, what: str, eval_files: Sequence[str]) -> None:
        mine = [c for c in todo if c.index % parts == part - 1]
        print(f"molora sweep: {what}: {len(mine)} of {total} cells here"
              f"{f' (part {part}/{parts})' if parts > 1 else ''}", flush=True)
        for c in mine:
            t0 = time.perf_counter()
            try:
                status = run_cell(opts["recipe"], c, overrides, budget, lora_rank, out, eval_files, active,
                                  reuse_for(c), opts["restart-changed"])
            except SweepError as e:  # the other cells still run; re-running the sweep resumes this one
                print(f"molora sweep: error: {e}", file=sys.stderr, flush=True)
                failed.append(c.name)
                continue
            print(f"molora sweep: {what} cell {c.index + 1}/{total} {c.name}: {status} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    # cells already on disk with other settings are refused before any work (the final cells of a search are
    # checked when their selection is known)
    if not opts["restart-changed"]:
        known = search_cells if grid else cells
        problems = []
        for c in known:
            if not (out / c.folder).exists():
                continue
            untuned = c.allocation == BASE_ARM
            cell_ov = ["--train.output_dir", str(out / c.folder)] if untuned else _cell_overrides(
                c, budget, lora_rank, out, active)
            try:
                _check_settings(c, out / c.folder, effective_settings(opts["recipe"], overrides, cell_ov, untuned),
                                False)
            except SweepError as e:
                problems.append(str(e))
        if problems:
            for p in problems:
                print(f"molora sweep: error: {p}", file=sys.stderr)
            return 2
    selection = None
    if grid and opts["phase"] in ("search", "all"):
        run_all(search_cells, len(search_cells), "search", ())
    if grid:
        try:
            selection = select_settings(out, search_cells, grid, primary,
                                        require_all=opts["phase"] != "search" and not failed)
        except SweepError as e:
            print(f"molora sweep: error: {e}", file=sys.stderr)
            return 1 if failed else 2
        if not selection["missing"]:
            _write_json_atomic(out / "search.json", selection)
            for slug, s in selection["arms"].items():
                print(f"molora sweep: selected for {slug} on validation ({selection['primary']} "
                      f"{s['scores'][s['selected']]:.3f}): {s['setting']}", flush=True)
    final = plan_cells(allocations, seeds, {k: v["setting"] for k, v in (selection or {}).get("arms", {}).items()})
    if opts["phase"] in ("final", "all") and not (grid and failed):
        run_all(final, len(final), "final", opts["eval_files"])
    try:
        summary = summarise(out, final, primary=primary, selection=selection)
    except SweepError as e:
        print(f"molora sweep: error: {e}", file=sys.stderr)
        return 2
    print(summary_markdown(summary))
    print(f"molora sweep: wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'summary.png'}")
    if failed:
        print(f"molora sweep: {len(failed)} cell(s) failed: {', '.join(failed)}; their logs are beside them; "
              f"run the same command again to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
