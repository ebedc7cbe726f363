"""Per-layer scores -> integer expert counts, the budget met exactly.

``E_l ∝ w_l`` with ``w_l = score_l^β`` (methods where a higher score deserves more experts) or
``w_l = score_l^(-β)`` (the other direction), then:

1. **bounds** by water-filling: shares ``clip(λ·w_l, min, max)`` with λ chosen so they sum to the budget
   (bisection; the sum is monotone in λ): a layer pushed to a bound stays there and the others share the rest
   in proportion to their weights;
2. **integers** by the largest remainder: every layer gets the floor of its share, and the experts left go to
   the largest fractional parts (ties: the higher weight, then the lower layer index), never past a bound.

The result sums to ``budget`` exactly. With ``groups=G`` the scores are first averaged over G contiguous groups
of layers (the paper's block shapes); every layer of a group then gets the same count, which meets the budget
only where the group sizes allow it (see :func:`molora.allocation.specs.distribute_budget`).

Pure Python: no torch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .specs import AUTO_PREFIX, AllocationError, distribute_budget, group_sizes, is_auto

__all__ = ["MappingError", "scores_to_experts", "AUTO_PREFIX", "is_auto", "group_means"]


class MappingError(AllocationError):
    """Scores or bounds that cannot give an allocation (the message names the value and what is allowed)."""


def group_means(values: Sequence[float], groups: int) -> list[float]:
    """Each value replaced by the mean of its group (G contiguous groups, ``numpy.array_split`` sizes)."""
    out: list[float] = []
    start = 0
    for n in group_sizes(len(values), groups):
        chunk = values[start:start + n]
        out.extend([sum(chunk) / n] * n)
        start += n
    return out


def _weights(scores: Sequence[float], beta: float, higher_gets_more: bool) -> list[float]:
    bad = [(i, s) for i, s in enumerate(scores) if not (isinstance(s, (int, float)) and math.isfinite(s))]
    if bad:
        raise MappingError(f"score of layer {bad[0][0]} is {bad[0][1]!r}: scores must be finite numbers")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise MappingError(f"beta={beta!r} must be a finite number >= 0")
    neg = [(i, s) for i, s in enumerate(scores) if s < 0]
    if neg and beta != 0:
        raise MappingError(f"score of layer {neg[0][0]} is {neg[0][1]:g} < 0: a power of it is undefined; use "
                           f"scores >= 0")
    floor = 1e-12 * max((abs(s) for s in scores), default=1.0) or 1e-12
    w = [max(float(s), floor) ** (beta if higher_gets_more else -beta) for s in scores]
    total = sum(w)
    return [x / total for x in w]


def _water_fill(weights: Sequence[float], budget: int, lo: int, hi: float) -> list[float]:
    """Real shares ``clip(λ·w_l, lo, hi)`` summing to ``budget``: λ by bisection (the sum is monotone in λ), so
    layers pushed to a bound stay there and the rest share what is left in proportion to their weights."""
    def shares(lam: float) -> list[float]:
        return [min(hi, max(float(lo), lam * w)) for w in weights]

    lam_hi = 1.0
    for _ in range(4000):
        if sum(shares(lam_hi)) >= budget:
            break
        lam_hi *= 2.0
    lam_lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        if sum(shares(mid)) < budget:
            lam_lo = mid
        else:
            lam_hi = mid
    out = shares(lam_hi)
    # remove the bisection's last rounding error on the layers strictly inside the bounds
    free = [i for i, x in enumerate(out) if lo < x < hi]
    diff = budget - sum(out)
    if free and diff:
        fsum = sum(out[i] for i in free)
        for i in free:
            out[i] += diff * out[i] / fsum
    return out


def scores_to_experts(scores: Sequence[float], budget: int, *, beta: float = 1.0, higher_gets_more: bool = True,
                      min_experts: int = 1, max_experts: Optional[int] = None,
                      groups: Optional[int] = None, segments: Optional[Sequence[int]] = None) -> list[int]:
    """Integer experts per layer from per-layer scores (see the module doc).

    Args:
        scores: one finite score per layer (>= 0 unless ``beta == 0``).
        budget: total experts over all layers.
        beta: exponent of the score (0: uniform).
        higher_gets_more: the method's direction.
        min_experts, max_experts: bounds per layer (``max_experts=None``: no upper bound).
        groups: average the scores over this many contiguous groups first (None: per layer).
        segments: the scores are several per-layer series one after the other (attn-mlp: ``[L, L]``, attention
            then MLP); ``groups`` then applies inside each series (G groups each), the budget to all together.
    Returns:
        list of ints, one per layer, summing to ``budget`` (with ``groups``: as near as the group sizes allow).
    Raises:
        MappingError naming the value: no scores, a budget outside [L * min, L * max], bad bounds or scores.
    """
    n = len(scores)
    if n == 0:
        raise MappingError("no layer scores to map (the model has no targeted layers)")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MappingError(f"budget={budget!r} must be a positive int (total experts)")
    if isinstance(min_experts, bool) or not isinstance(min_experts, int) or min_experts < 1:
        raise MappingError(f"min={min_experts!r} must be an int >= 1 (every layer needs an expert)")
    if max_experts is not None and (not isinstance(max_experts, int) or max_experts < min_experts):
        raise MappingError(f"max={max_experts!r} must be an int >= min={min_experts}")
    if budget < n * min_experts:
        raise MappingError(f"budget={budget} is below {n} layers x min {min_experts} = {n * min_experts} experts; "
                           f"raise the budget or lower --min")
    if max_experts is not None and budget > n * max_experts:
        raise MappingError(f"budget={budget} is above {n} layers x max {max_experts} = {n * max_experts} experts; "
                           f"lower the budget or raise --max")
    w = _weights(scores, beta, higher_gets_more)
    if segments is not None and (sum(segments) != n or any(s < 1 for s in segments)):
        raise MappingError(f"segments={list(segments)} must be positive and sum to the {n} scores")
    if groups is not None:
        per = min(segments) if segments is not None else n
        if not isinstance(groups, int) or not 1 <= groups <= per:
            raise MappingError(f"groups={groups!r} must be an int between 1 and the number of layers ({per})")
        if segments is not None:  # G groups in each series, one water level over all of them
            gw, start = [], 0
            for length in segments:
                gw.extend(group_means(w[start:start + length], groups))
                start += length
            alloc = distribute_budget(gw, n, budget)  # per-unit weights: runs of equal values are the groups
        else:
            gw = group_means(w, groups)
            shape = [gw[sum(group_sizes(n, groups)[:g])] for g in range(groups)]
            alloc = distribute_budget(shape, n, budget)
        off = [(i, e) for i, e in enumerate(alloc) if e < min_experts or (max_experts and e > max_experts)]
        if off:
            raise MappingError(f"with groups={groups} layer {off[0][0]} gets {off[0][1]} experts, outside "
                               f"[{min_experts}, {max_experts or 'no max'}]; use more groups or per-layer mapping")
        return alloc
    hi = float(max_experts) if max_experts is not None else float("inf")
    share = _water_fill(w, budget, min_experts, hi)
    alloc = [max(min_experts, int(math.floor(s))) for s in share]
    left = budget - sum(alloc)
    order = sorted(range(n), key=lambda i: (-(share[i] - math.floor(share[i])), -w[i], i))
    k = 0
    while left > 0 and k < 2 * n * max(1, left):
        i = order[k % n]
        if max_experts is None or alloc[i] < max_experts:
            alloc[i] += 1
            left -= 1
        k += 1
    if left != 0:  # pragma: no cover - the shares sum to the budget inside the bounds
        raise MappingError(f"internal: could not place {left} experts within [{min_experts}, {max_experts}]")
    return alloc
