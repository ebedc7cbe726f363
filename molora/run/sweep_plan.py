"""The plan of ``molora sweep``: arms (``--allocations``), search grids (``--search``), final and search cells,
the equal-budget arithmetic (experts of the mixture, the matched LoRA ranks) and each cell's recipe overrides.
Running the cells is :mod:`molora.run.sweep`."""
from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .recipe import Recipe
from .sweep_report import SweepError


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


def grid_edges(grid: Sequence[dict[str, str]], selected: int) -> list[tuple[str, str, str]]:
    """The numeric search axes on which grid point ``selected`` takes the smallest or largest value searched.

    Returns ``[(key, value, "smallest" | "largest"), ...]``; axes with one value or a non-numeric value are left
    out. A choice on the edge means the optimum may lie outside the grid: widen that axis for every arm."""
    edges = []
    for key, raw in grid[selected].items():
        try:
            values = sorted({float(p[key]) for p in grid})
            v = float(raw)
        except ValueError:
            continue
        if len(values) < 2:
            continue
        if v == values[0]:
            edges.append((key, raw, "smallest"))
        elif v == values[-1]:
            edges.append((key, raw, "largest"))
    return edges


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
    return _meta_model_named(recipe.model.name_or_path)


@functools.lru_cache(maxsize=4)
def _meta_model_named(name: str):
    from .recipe import PACKAGED_MODEL_NAMES

    if name in PACKAGED_MODEL_NAMES:
        from .assets import cache_dir, load_model_and_tokenizer

        load_model_and_tokenizer(name)  # converts once into the cache
        name = str(cache_dir() / "models" / name)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(cfg)


def _params_per_rank(model, num_layers: int, targets) -> int:
    """Parameters of one rank of a plain LoRA over the targeted projections: sum(d_in + d_out)."""
    from ..allocation.auto import layer_params

    return sum(layer_params(model, [1] * num_layers, 1, targets)) - sum(layer_params(model, [1] * num_layers, 0,
                                                                                    targets))


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
    per_rank = _params_per_rank(model, n, targets)
    shared = getattr(a, "shared_expert_r", 0) or 0
    mix += shared * per_rank  # an always-on shared expert of rank s is a rank-s LoRA beside the routed experts
    rank = max(1, round(mix / per_rank))
    lora = rank * per_rank
    return budget, rank, mix, lora


#: an arm whose trainable parameters differ from the sweep's budget by more than this share is flagged
PARAM_MISMATCH = 0.10


def check_arms(recipe_path: str, overrides: Sequence[str], cells: Sequence[Cell], budget: int, lora_rank: int,
               mix_params: int, out: Path) -> list[str]:
    """Build every mixture arm's allocation on the model (shapes only) before any cell trains.

    Raises SweepError naming the arm (and its search setting) when a cell could not be built -- e.g. an arm that
    lowers ``expert_budget`` until some layers hold fewer experts than ``top_k``. Returns one warning per arm whose
    trainable parameters (routed experts, routers and shared expert) differ from the sweep's budget
    ``mix_params`` by more than :data:`PARAM_MISMATCH`: its rows are then not an equal-budget comparison.
    ``auto:`` arms are left out (their allocation comes from the data when the cell starts; it holds the budget).
    """
    from ..allocation.auto import layer_params
    from ..allocation.signals import blocks_of
    from ..allocation.specs import AllocationError, is_auto, resolve_allocation
    from .recipe import RecipeError, load_recipe, parse_overrides

    warnings_: list[str] = []
    seen: set[tuple] = set()
    for cell in cells:
        key = (cell.slug, tuple(cell.extra))
        if cell.allocation in LORA_ARMS or cell.allocation == BASE_ARM or is_auto(cell.allocation) or key in seen:
            continue
        seen.add(key)
        where = f"arm {cell.arm.spec if cell.arm is not None else cell.allocation!r}" + (
            f" with {' '.join(cell.extra)}" if cell.extra else "")
        try:
            recipe = load_recipe(recipe_path, parse_overrides([*overrides, *_cell_overrides(cell, budget, lora_rank,
                                                                                              out)]))
            a = recipe.allocation
            model = _meta_model(recipe)
            n = len(blocks_of(model)[1])
            layers = resolve_allocation(a.num_experts, a.top_k, a.r, n, expert_budget=a.expert_budget,
                                        router=a.router, num_experts_mlp=a.num_experts_mlp)
        except (AllocationError, RecipeError, ValueError) as e:
            raise SweepError(f"{where}: its cells cannot be built on {recipe_path}'s model: {e}") from None
        targets = a.target_modules if isinstance(a.target_modules, list) else None
        mlp = [x.num_experts_mlp for x in layers] if a.num_experts_mlp is not None else None
        params = sum(layer_params(model, [x.num_experts for x in layers], [x.r for x in layers], targets, mlp))
        params += a.shared_expert_r * _params_per_rank(model, n, targets)  # the shared expert: a plain LoRA
        if abs(params / mix_params - 1) > PARAM_MISMATCH and (cell.slug, params) not in seen:
            seen.add((cell.slug, params))  # once per arm, unless a search setting changes its size
            warnings_.append(f"{where}: ~{params:,} trainable params, {params / mix_params - 1:+.0%} against the "
                             f"sweep's budget (~{mix_params:,}, matched LoRA rank {lora_rank}): its rows are not an "
                             f"equal-budget comparison (a shared expert or a larger r adds parameters; lower "
                             f"allocation.expert_budget in the arm to pay for them)")
    return warnings_


def active_rank(recipe: Recipe) -> int:
    """Rank of one LoRA with the mixtures' active rank per token: top_k x r (+ the shared expert's rank)."""
    a = recipe.allocation
    if not (isinstance(a.top_k, int) and isinstance(a.r, int)):
        raise SweepError(f"lora-active needs one top_k and one r for all layers (got top_k={a.top_k!r}, r={a.r!r}); "
                         f"give them as ints or drop lora-active")
    return a.top_k * a.r + (getattr(a, "shared_expert_r", 0) or 0)


def _lora_overrides(rank: int) -> list[str]:
    """Plain LoRA as PEFT builds it, whatever mixture levers the recipe sets: one expert, kaiming A, B = 0, the
    plain top-k router (a no-op over one expert), no shared expert, no aux loss. An arm's own overrides (``lora@...``)
    still apply after these."""
    return ["--allocation.num_experts", "1", "--allocation.top_k", "1", "--allocation.r", str(rank),
            "--allocation.lora_alpha", str(2 * rank), "--allocation.expert_budget", "null",
            "--allocation.num_experts_mlp", "null", "--allocation.aux_loss_coef", "0",
            "--allocation.shared_expert_r", "0", "--allocation.expert_init", "kaiming",
            "--allocation.router", "topk", "--allocation.router_options", "null"]


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
