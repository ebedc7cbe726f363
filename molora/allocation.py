"""Layer-wise allocation: how many experts, which top-k and which rank each layer gets.

A per-layer value (``num_experts``, ``top_k`` or ``r``) is given as one of:

* an int: the same value for every layer, e.g. ``8``;
* a list with one entry per layer, e.g. ``[2, 2, 4, 4, 6, 6, 8, 8]``;
* MoLA block notation: a comma-separated string (``"2,4,6,8"``) or, when every value is a single digit,
  the digits run together (``"2468"``). The L layers are split into as many contiguous groups as there
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

  Presets are for ``num_experts``. With ``expert_budget=N`` the preset's shape is scaled so that the
  experts of all layers sum to N (largest-remainder rounding, at least 1 per layer).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

AllocationSpec = Union[int, Sequence[int], str]

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


class AllocationError(ValueError):
    """A malformed or impossible allocation. The message names the value and what is allowed."""


def preset_name(spec: str) -> Optional[str]:
    """The canonical preset name of ``spec`` or None if it is not a preset."""
    key = spec.strip().lower()
    if key in PRESETS:
        return key
    return PRESET_ALIASES.get(spec.strip(), PRESET_ALIASES.get(key))


def parse_blocks(spec: str, field: str = "value") -> list[int]:
    """Parse MoLA block notation ``"2,4,6,8"`` / ``"2468"`` into group values (no layer count needed)."""
    s = spec.strip()
    if re.fullmatch(r"\d+(\s*,\s*\d+)+|\d+\s*,?", s):
        values = [int(v) for v in s.replace(" ", "").strip(",").split(",")] if "," in s else None
        if values is None:
            # run-together digits: "2468" is four groups and "12" two (1, 2); a lone digit "8" is one group;
            # values above 9 need commas ("12," or "10,12")
            values = [int(c) for c in s] if len(s) > 1 else [int(s)]
        return values
    names = ", ".join(sorted(PRESETS)) + ", " + ", ".join(k for k in PRESET_ALIASES if not k.isascii())
    raise AllocationError(
        f"{field}={spec!r} is neither block notation (comma-separated integers like '2,4,6,8' or single digits "
        f"like '2468') nor a preset (allowed: {names})"
    )


def validate_spec(spec: AllocationSpec, field: str, allow_preset: bool) -> None:
    """Check what can be checked without knowing the model (types, values >= 1, syntax, preset names)."""
    if isinstance(spec, bool):
        raise AllocationError(f"{field}={spec!r}: expected an int, a list of ints or a string, not a bool")
    if isinstance(spec, int):
        values = [spec]
    elif isinstance(spec, str):
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


def distribute_budget(shape: Sequence[int], num_layers: int, budget: int) -> list[int]:
    """Scale a group shape so the per-layer values sum to ``budget`` (largest remainder, min 1 per layer)."""
    if budget < num_layers:
        raise AllocationError(f"expert_budget={budget} is less than one expert per layer ({num_layers} layers)")
    weights = expand_groups(shape, num_layers)
    total = float(sum(weights))
    raw = [budget * w / total for w in weights]
    alloc = [max(1, int(x)) for x in raw]
    # largest remainder: hand out (or take back) the difference by fractional part
    order = sorted(range(num_layers), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    diff = budget - sum(alloc)
    i = 0
    while diff != 0:
        j = order[i % num_layers] if diff > 0 else order[::-1][i % num_layers]
        if diff > 0:
            alloc[j] += 1
            diff -= 1
        elif alloc[j] > 1:
            alloc[j] -= 1
            diff += 1
        i += 1
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
    validate_spec(spec, field, allow_preset=(field == "num_experts"))
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


@dataclass(frozen=True)
class LayerAllocation:
    """The resolved allocation of one layer."""

    layer: Optional[int]
    num_experts: int
    top_k: int
    r: int


def resolve_allocation(num_experts: AllocationSpec, top_k: AllocationSpec, r: AllocationSpec,
                       num_layers: Optional[int], expert_budget: Optional[int] = None,
                       router: str = "topk") -> list[LayerAllocation]:
    """Resolve the three per-layer specs and check them against each other (top-k <= experts)."""
    experts = resolve(num_experts, num_layers, "num_experts", budget=expert_budget)
    ks = resolve(top_k, num_layers, "top_k")
    ranks = resolve(r, num_layers, "r")
    out = []
    for i, (e, k, rank) in enumerate(zip(experts, ks, ranks)):
        if router == "topk" and k > e:
            where = f"layer {i}" if num_layers is not None else "the model"
            raise AllocationError(f"top_k={k} is larger than num_experts={e} in {where}; top_k must be between 1 "
                                  f"and the number of experts of that layer (num_experts resolves to {experts})")
        out.append(LayerAllocation(layer=i if num_layers is not None else None, num_experts=e, top_k=min(k, e), r=rank))
    return out
