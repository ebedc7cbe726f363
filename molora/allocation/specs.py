"""Layer-wise allocation: how many experts, which top-k and which rank each layer gets.

A per-layer value (``num_experts``, ``top_k`` or ``r``) is given as one of:

* an int: the same value for every layer, e.g. ``8``;
* a list with one entry per layer, e.g. ``[2, 2, 4, 4, 6, 6, 8, 8]``;
* MoLA block notation: a comma-separated string (``"2,4,6,8"``; ``"2|4|6|8"`` is the same, for places where a
  comma separates something else, e.g. an arm of ``molora sweep --allocations``) or, when every value is a
  single digit, the digits run together (``"2468"``). The L layers are split into as many contiguous groups as there
  are values; when L is not divisible by the number of groups, the first ``L mod G`` groups get one layer
  more (``numpy.array_split`` semantics; 30 layers in 4 groups: 8, 8, 7, 7);
* a preset name (the shapes of the MoLA paper, four groups of layers, 20 experts per four layers):

  ====================  =======  ===========  =========================================
  name                  symbol   groups       meaning
  ====================  =======  ===========  =========================================
  ``uniform``           □        5,5,5,5      same number everywhere
  ``inverted_triangle`` ▽        2,4,6,8      more experts in higher layers (best in the paper)
  ``triangle``          △        8,6,4,2      more experts in lower layers
  ``hourglass``         ⋈        8,2,2,8      many at both ends, few in the middle
  ``diamond``           ◇        2,8,8,2      many in the middle, few at the ends
  ====================  =======  ===========  =========================================

  Presets are for ``num_experts``. With ``expert_budget=N`` the shape is scaled so that the experts of all
  layers sum to N, or as near as the shape allows with equal counts inside each group (see
  :func:`distribute_budget`; a warning says when the total differs).

Over 400 lines: every spec form, budgets, resolution and their messages. Pure Python (no torch): recipes validate
with it before torch is imported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

__all__ = ["AllocationSpec", "PRESETS", "PRESET_ALIASES", "AUTO_PREFIX", "AllocationError", "AllocationWarning",
           "LayerAllocation", "preset_name", "parse_blocks", "validate_spec", "group_sizes", "expand_groups",
           "distribute_budget", "resolve", "resolve_allocation", "is_auto", "auto_method", "describe_runs",
           "resolve_routers", "router_names_of", "is_per_layer_router", "selects_top_k", "router_registry"]

AllocationSpec = Union[int, Sequence[int], str]
#: ``num_experts: "auto:block-influence"``: computed from the model (and data) before injection (molora.run.allocate)
AUTO_PREFIX = "auto:"


def is_auto(spec: object) -> bool:
    """True for a data-driven spec ``"auto:METHOD"``."""
    return isinstance(spec, str) and spec.strip().lower().startswith(AUTO_PREFIX)


def auto_method(spec: str) -> str:
    """``"auto:Block-Influence"`` -> ``"block-influence"``."""
    return spec.strip()[len(AUTO_PREFIX):].strip().lower()

PRESETS: dict[str, tuple[int, ...]] = {
    "uniform": (5, 5, 5, 5),
    "inverted_triangle": (2, 4, 6, 8),
    "triangle": (8, 6, 4, 2),
    "hourglass": (8, 2, 2, 8),
    "diamond": (2, 8, 8, 2),
}
PRESET_ALIASES: dict[str, str] = {
    "□": "uniform", "square": "uniform", "rectangle": "uniform",
    "▽": "inverted_triangle", "inverted-triangle": "inverted_triangle", "mola": "inverted_triangle",
    "△": "triangle",
    "⋈": "hourglass",
    "◇": "diamond",
}


def router_registry():
    """The router registry, :mod:`molora_kernels.routers` (pure Python: importing it does not import torch)."""
    from molora_kernels import routers

    return routers


def selects_top_k(router: str) -> bool:
    """Whether ``router`` picks top-k experts per token (then top_k must be <= a layer's experts)."""
    try:
        return router_registry().get_router(router).selects_top_k
    except ValueError as e:
        raise AllocationError(str(e)) from None


RouterSpec = Union[str, Sequence[str]]


def router_names_of(spec: RouterSpec) -> list[str]:
    """The router names a router spec uses: ``"topk"``, ``"topk,topp"`` (contiguous groups of layers, like block
    notation) or a per-layer list; each checked against the registry (AllocationError naming the known ones)."""
    if isinstance(spec, str):
        names = [n.strip() for n in spec.split(",")] if "," in spec else [spec.strip()]
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(n, str) for n in spec):
        names = [n.strip() for n in spec]
    else:
        raise AllocationError(f"router={spec!r}: give a router name, comma-separated names for contiguous groups "
                              f"of layers ('topk,topp') or one name per layer")
    for n in names:
        selects_top_k(n)  # AllocationError for an unknown name
    return names


def is_per_layer_router(spec: RouterSpec) -> bool:
    return not (isinstance(spec, str) and "," not in spec)


def resolve_routers(spec: RouterSpec, num_layers: Optional[int]) -> list[str]:
    """One router name per layer (``[name]`` for a single router, also on a model without numbered layers)."""
    names = router_names_of(spec)
    if not is_per_layer_router(spec):
        return names * (num_layers or 1)
    if num_layers is None:
        raise AllocationError(f"router={spec!r} is per layer, but the model has no numbered layers; give one name")
    if isinstance(spec, str):
        if len(names) > num_layers:
            raise AllocationError(f"router={spec!r} has {len(names)} groups but the model has {num_layers} layers")
        out: list[str] = []
        for name, n in zip(names, group_sizes(num_layers, len(names))):
            out.extend([name] * n)
        return out
    if len(names) != num_layers:
        raise AllocationError(f"router={list(spec)!r} has {len(names)} entries but the model has {num_layers} layers; "
                              f"give one per layer, comma-separated groups ('topk,topp') or one name")
    return names


class AllocationError(ValueError):
    """A malformed or impossible allocation. The message names the value and what is allowed."""


def preset_name(spec: str) -> Optional[str]:
    """The canonical preset name of ``spec`` or None if it is not a preset."""
    key = spec.strip().lower()
    if key in PRESETS:
        return key
    return PRESET_ALIASES.get(spec.strip(), PRESET_ALIASES.get(key))


def parse_blocks(spec: str, field: str = "value") -> list[int]:
    """Parse MoLA block notation ``"2,4,6,8"`` / ``"2|4|6|8"`` / ``"2468"`` into group values (no layer count needed)."""
    s = spec.strip()
    if re.fullmatch(r"\d+(\s*\|\s*\d+)+", s):
        s = s.replace("|", ",")
    if re.fullmatch(r"\d+(\s*,\s*\d+)+|\d+\s*,?", s):
        values = [int(v) for v in s.replace(" ", "").strip(",").split(",")] if "," in s else None
        if values is None:
            # run-together digits: "2468" is four groups and "12" two (1, 2); a lone digit "8" is one group;
            # values above 9 need commas ("12," or "10,12")
            values = [int(c) for c in s] if len(s) > 1 else [int(s)]
        return values
    names = ", ".join(sorted(PRESETS)) + ", " + ", ".join(k for k in PRESET_ALIASES if not k.isascii())
    raise AllocationError(
        f"{field}={spec!r} is neither block notation (comma-separated integers like '2,4,6,8' or '2|4|6|8', or "
        f"single digits like '2468') nor a preset (allowed: {names})"
    )


def validate_spec(spec: AllocationSpec, field: str, allow_preset: bool) -> None:
    """Check what can be checked without knowing the model (types, values >= 1, syntax, preset names)."""
    if isinstance(spec, bool):
        raise AllocationError(f"{field}={spec!r}: expected an int, a list of ints or a string, not a bool")
    if isinstance(spec, int):
        values = [spec]
    elif isinstance(spec, str):
        if is_auto(spec):
            if field != "num_experts":
                raise AllocationError(f"{field}={spec!r}: data-driven allocations ({AUTO_PREFIX}METHOD) are for "
                                      f"num_experts only")
            if not auto_method(spec):
                raise AllocationError(f"{field}={spec!r}: name the method after {AUTO_PREFIX!r}, e.g. "
                                      f"'auto:block-influence'")
            return  # the method name is checked against molora.allocation.methods by the caller
        if preset_name(spec) is not None:
            if not allow_preset:
                raise AllocationError(f"{field}={spec!r}: presets are shapes for num_experts only; "
                                      f"give {field} as an int, a list or block notation")
            return
        values = parse_blocks(spec, field)
    elif isinstance(spec, (list, tuple)):
        if not spec:
            raise AllocationError(f"{field}=[]: a per-layer list needs one entry per layer")
        bad = [v for v in spec if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise AllocationError(f"{field}={list(spec)!r}: every entry must be an int, got {bad[0]!r}")
        values = list(spec)
    else:
        raise AllocationError(f"{field}={spec!r}: expected an int, a list of ints or a string, "
                              f"not {type(spec).__name__}")
    low = [v for v in values if v < 1]
    if low:
        raise AllocationError(f"{field}={spec!r}: every value must be >= 1, got {low[0]}")


def group_sizes(num_layers: int, num_groups: int) -> list[int]:
    """Sizes of ``num_groups`` contiguous groups over ``num_layers`` (first ``L mod G`` groups one larger)."""
    if num_groups > num_layers:
        raise AllocationError(f"{num_groups} groups cannot be spread over {num_layers} layers; "
                              f"give at most {num_layers} block values")
    base, extra = divmod(num_layers, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def expand_groups(values: Sequence[int], num_layers: int) -> list[int]:
    out: list[int] = []
    for v, n in zip(values, group_sizes(num_layers, len(values))):
        out.extend([v] * n)
    return out


class AllocationWarning(UserWarning):
    """An allocation was resolved, but not exactly as asked (e.g. a budget that the shape cannot meet exactly)."""


def _runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of equal values: [(value, length), ...]."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


def distribute_budget(shape: Sequence[int], num_layers: int, budget: int) -> list[int]:
    """Scale a shape so the experts of all layers sum to (about) ``budget``, keeping the shape.

    ``shape`` holds group values (block notation or a preset: groups as :func:`group_sizes`) or, when it has
    one entry per layer, per-layer values whose runs of equal values form the groups. Guarantees:

    * every layer of a group gets the same count, and it is at least 1;
    * the order of the shape is kept: a group with a larger shape value never gets fewer experts than one with
      a smaller value, and groups with equal shape values get equal counts;
    * each group's count is its proportional share ``budget * w_g / sum(n_g * w_g)`` rounded down or up; of the
      roundings that keep the order, the one whose total is closest to ``budget`` is taken (ties: the one
      closest to the proportional shares).

    The total is then exact whenever some such rounding sums to the budget (e.g. ▽ on 8 layers with 40 or 20
    experts), else the nearest the shape allows: a group of n layers moves the total in steps of n. An
    :class:`AllocationWarning` names the total used and the nearest exact alternatives in that case.
    """
    if budget < num_layers:
        raise AllocationError(f"expert_budget={budget} is less than one expert per layer ({num_layers} layers)")
    if len(shape) == num_layers:
        runs = _runs(shape)
        weights, sizes = [v for v, _ in runs], [n for _, n in runs]
    else:
        weights, sizes = list(shape), group_sizes(num_layers, len(shape))
    denom = float(sum(w * n for w, n in zip(weights, sizes)))
    # classes: groups with equal shape value share one count; processed in ascending shape order
    classes = sorted(set(weights))
    size_of = {w: sum(n for ww, n in zip(weights, sizes) if ww == w) for w in classes}
    ideal_of = {w: budget * w / denom for w in classes}
    # DP over classes: state (last count, total) -> (squared error, counts so far)
    states: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {(0, 0): (0.0, ())}
    for w in classes:
        x = ideal_of[w]
        cands = sorted({max(1, int(x)), max(1, -int(-x // 1))})
        nxt: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {}
        for (last, total), (err, counts) in states.items():
            for c in cands:
                if c < last:
                    continue  # would break the shape's order
                key = (c, total + c * size_of[w])
                cand = (err + size_of[w] * (c - x) ** 2, counts + (c,))
                if key not in nxt or cand[0] < nxt[key][0]:
                    nxt[key] = cand
        states = nxt
    totals = sorted({t for _, t in states})
    best_total = min(totals, key=lambda t: (abs(t - budget), t > budget))
    _err, counts = min((v for (_, t), v in states.items() if t == best_total), key=lambda v: v[0])
    count_of = dict(zip(classes, counts))
    alloc: list[int] = []
    for w, n in zip(weights, sizes):
        alloc.extend([count_of[w]] * n)
    if best_total != budget:
        import warnings

        below = max((t for t in totals if t < budget), default=None)
        above = min((t for t in totals if t > budget), default=None)
        near = " or ".join(str(t) for t in (below, above) if t is not None)
        warnings.warn(f"expert_budget={budget}: the shape {list(shape)} over {num_layers} layers (groups of "
                      f"{sizes} layers) cannot sum to exactly {budget} with equal counts inside each group; using "
                      f"{best_total} experts (the nearest totals it allows: {near})",
                      AllocationWarning, stacklevel=3)
    return alloc


def resolve(spec: AllocationSpec, num_layers: Optional[int], field: str,
            budget: Optional[int] = None) -> list[int]:
    """Resolve a spec to one value per layer.

    Args:
        spec: int, per-layer list, block string or preset name.
        num_layers: layer count of the model, or None for a model without numbered layers (then only an int
            is meaningful and the result has one entry).
        field: the config field name, for error messages.
        budget: total experts over all layers (num_experts only) to scale a shape to.
    Returns:
        list of length ``num_layers`` (or 1 when ``num_layers`` is None).
    """
    validate_spec(spec, field, allow_preset=field.startswith("num_experts"))
    if is_auto(spec):
        raise AllocationError(f"{field}={spec!r} is computed from the model before injection: resolve it with "
                              f"molora.run.allocate.resolve_recipe_auto (molora train does) and pass the per-layer list")
    if num_layers is None:
        if isinstance(spec, int) and budget is None:
            return [spec]
        raise AllocationError(
            f"{field}={spec!r} is a per-layer allocation, but the model has no numbered layers (no nn.ModuleList "
            f"of blocks around the target modules); give {field} as a single int"
        )
    if isinstance(spec, str) and preset_name(spec) is not None:
        shape = PRESETS[preset_name(spec)]
    elif isinstance(spec, str):
        shape = parse_blocks(spec, field)
    elif isinstance(spec, int):
        shape = [spec]
    else:
        if len(spec) != num_layers:
            raise AllocationError(f"{field}={list(spec)!r} has {len(spec)} entries but the model has {num_layers} "
                                  f"layers; give one entry per layer, a block string like '2,4,6,8' or an int")
        shape = None
        if budget is None:
            return list(spec)
    if budget is not None:
        return distribute_budget(shape if shape is not None else list(spec), num_layers, budget)
    if len(shape) > num_layers:
        raise AllocationError(f"{field}={spec!r} has {len(shape)} groups but the model has only "
                              f"{num_layers} layers")
    return expand_groups(shape, num_layers)


def _boundaries(spec: AllocationSpec, num_layers: int) -> Optional[set[int]]:
    """Layer indices where a block/preset spec starts a new group (None for ints and per-layer lists)."""
    if not isinstance(spec, str):
        return None
    values = list(PRESETS[preset_name(spec)]) if preset_name(spec) else parse_blocks(spec)
    if len(values) <= 1 or len(values) > num_layers:
        return None
    starts, pos = set(), 0
    for n in group_sizes(num_layers, len(values))[:-1]:
        pos += n
        starts.add(pos)
    return starts


def describe_runs(experts: Sequence[int], ks: Sequence[int], ranks: Sequence[int],
                  experts_mlp: Optional[Sequence[Optional[int]]] = None) -> str:
    """``layers 0-7: 2 experts, top_k 2, r 8; layer 8: ...`` (runs of equal rows of a resolved allocation);
    with ``experts_mlp``: ``layers 0-3: 2 attention / 3 MLP experts, ...``."""
    rows, start = [], 0
    mlp = list(experts_mlp) if experts_mlp is not None else [None] * len(experts)
    rows_in = list(zip(experts, ks, ranks, mlp))
    for i in range(1, len(rows_in) + 1):
        if i == len(rows_in) or rows_in[i] != rows_in[start]:
            e, k, rk, em = rows_in[start]
            span = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            count = f"{e} experts" if em is None else f"{e} attention / {em} MLP experts"
            rows.append(f"{span}: {count}, top_k {k}, r {rk}")
            start = i
    return "; ".join(rows)


def _warn_misaligned_groups(num_experts: AllocationSpec, others: dict[str, AllocationSpec], num_layers: int,
                            experts: Sequence[int], ks: Sequence[int], ranks: Sequence[int]) -> None:
    """Warn when block groups of top_k / r cut through the groups of num_experts (legal, but rarely meant)."""
    base = _boundaries(num_experts, num_layers)
    if base is None:
        return
    import warnings

    for field, spec in others.items():
        mine = _boundaries(spec, num_layers)
        if mine is not None and not mine <= base:
            warnings.warn(f"{field}={spec!r} splits the {num_layers} layers into groups that do not line up with "
                          f"num_experts={num_experts!r} (group starts {sorted(mine)} vs {sorted(base)}); resolved: "
                          f"{describe_runs(experts, ks, ranks)}", AllocationWarning, stacklevel=3)


@dataclass(frozen=True)
class LayerAllocation:
    """The resolved allocation of one layer."""

    layer: Optional[int]
    num_experts: int
    top_k: int
    r: int
    #: experts of the layer's MLP projections when they differ from its attention projections (``num_experts``
    #: then holds for attention); None: every projection of the layer has ``num_experts``
    num_experts_mlp: Optional[int] = None
    #: the layer's router when routers are chosen per layer; None: the config's single router
    router: Optional[str] = None

    def experts_for(self, kind: Optional[str]) -> int:
        """The expert count of a projection of this layer of module kind ``kind`` ("attn", "mlp" or None)."""
        return self.num_experts_mlp if (kind == "mlp" and self.num_experts_mlp is not None) else self.num_experts

    def row(self) -> dict:
        """The adapter config's allocation row (``num_experts_mlp`` only when split, so old tables still match)."""
        d = {"layer": self.layer, "num_experts": self.num_experts, "top_k": self.top_k, "r": self.r}
        if self.num_experts_mlp is not None:
            d["num_experts_mlp"] = self.num_experts_mlp
        if self.router is not None:
            d["router"] = self.router
        return d


def resolve_allocation(num_experts: AllocationSpec, top_k: AllocationSpec, r: AllocationSpec,
                       num_layers: Optional[int], expert_budget: Optional[int] = None,
                       router: RouterSpec = "topk",
                       num_experts_mlp: Optional[AllocationSpec] = None) -> list[LayerAllocation]:
    """Resolve the per-layer specs and check them against each other (top-k <= experts).

    ``num_experts_mlp`` (optional) gives the MLP projections of each layer their own expert count; ``num_experts``
    then holds for the attention projections. With ``expert_budget`` both are scaled to it, so attention and MLP
    together hold 2 x ``expert_budget`` experts -- as many as an unsplit allocation with that budget.
    """
    experts = resolve(num_experts, num_layers, "num_experts", budget=expert_budget)
    ks = resolve(top_k, num_layers, "top_k")
    ranks = resolve(r, num_layers, "r")
    per_layer = is_per_layer_router(router)
    routers = resolve_routers(router, num_layers)
    mlp: list[Optional[int]] = [None] * len(experts)
    if num_experts_mlp is not None:
        if num_layers is None:
            raise AllocationError(f"num_experts_mlp={num_experts_mlp!r} is per layer (attention and MLP of each "
                                  f"numbered block), but the model has no numbered layers; drop num_experts_mlp")
        mlp = resolve(num_experts_mlp, num_layers, "num_experts_mlp", budget=expert_budget)
    if num_layers is not None:
        _warn_misaligned_groups(num_experts, {"top_k": top_k, "r": r}, num_layers, experts, ks, ranks)
    out = []
    for i, (e, k, rank, em, rname) in enumerate(zip(experts, ks, ranks, mlp, routers)):
        bounded = selects_top_k(rname)
        need_k = router_registry().get_router(rname).required_top_k
        if need_k is not None and k != need_k:
            where = f"layer {i}" if num_layers is not None else "the model"
            raise AllocationError(f"router {rname!r} works with top_k={need_k} only; {where} has top_k={k}")
        for field, count, all_counts in (("num_experts", e, experts), ("num_experts_mlp", em, mlp)):
            if bounded and count is not None and k > count:
                where = f"layer {i}" if num_layers is not None else "the model"
                hint = ""
                if isinstance(top_k, int) and top_k >= 10:  # "--allocation.top_k 1222" arrives as the int 1222
                    hint = (f"; top_k={top_k} is one int for every layer -- for one value per group of layers give "
                            f"block notation as a string: '{','.join(str(top_k))}' or '{'|'.join(str(top_k))}'")
                raise AllocationError(f"top_k={k} is larger than {field}={count} in {where}; top_k must be between 1 "
                                      f"and the number of experts of that layer ({field} resolves to {all_counts})"
                                      f"{hint}")
        k_eff = min(k, e) if em is None else min(k, e, em)
        out.append(LayerAllocation(layer=i if num_layers is not None else None, num_experts=e, top_k=k_eff, r=rank,
                                   num_experts_mlp=em, router=rname if per_layer else None))
    return out
