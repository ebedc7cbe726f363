"""Data-driven allocation on a model: :func:`allocate` runs a registered signal (:mod:`.methods`, :mod:`.signals`)
on a model and calibration batches and maps the scores to experts (:func:`.mapping.scores_to_experts`);
:func:`layer_params`, :func:`result_table` and :func:`yaml_fragment` present the result. Recipes (calibration
rows, the cache, ``auto:`` before injection) are the run wing's part: :mod:`molora.run.allocate`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from .mapping import scores_to_experts
from .methods import AllocationMethod, get_method

__all__ = ["AllocationResult", "allocate", "layer_params", "result_table", "yaml_fragment"]


@dataclass
class AllocationResult:
    """What :func:`allocate` found: per-layer ``scores`` and ``experts`` (sum = ``budget``, or as near as
    ``groups`` allow), with the settings that produced them."""

    method: str
    scores: list[float]
    experts: list[int]
    budget: int
    beta: float
    higher_gets_more: bool
    min_experts: int = 1
    max_experts: Optional[int] = None
    groups: Optional[int] = None
    calib_examples: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    #: per-kind methods (attn-mlp): ``scores``/``experts`` are the attention sub-blocks', these the MLP ones'
    #: (``experts`` + ``experts_mlp`` then sum to 2 x ``budget``)
    scores_mlp: Optional[list[float]] = None
    experts_mlp: Optional[list[int]] = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("detail")
        return d


def allocate(model, method: str, budget: int, *, batches: Optional[Sequence[dict]] = None,
             beta: Optional[float] = None, min_experts: int = 1, max_experts: Optional[int] = None,
             groups: Optional[int] = None, target_modules: Optional[Sequence[str]] = None) -> AllocationResult:
    """Scores of ``method`` on ``model`` (and ``batches``) mapped to ``budget`` experts (see the module doc)."""
    from . import signals

    m: AllocationMethod = get_method(method)
    if m.needs_data and not batches:
        raise ValueError(f"method {m.name!r} needs calibration rows (the recipe's training data)")
    if ":" in m.function:  # a method registered from a module of its own
        import importlib

        module, name = m.function.split(":")
        fn = getattr(importlib.import_module(module), name)
    else:
        fn = getattr(signals, m.function)
    ls = fn(model, batches, target_modules=target_modules)
    b = m.default_beta if beta is None else float(beta)
    experts_mlp = None
    if m.per_kind:  # attention and MLP scores compete for 2 x budget experts (as many as an unsplit allocation)
        n = len(ls.scores)
        both = scores_to_experts(list(ls.scores) + list(ls.scores_mlp), 2 * budget, beta=b,
                                 higher_gets_more=m.higher_gets_more, min_experts=min_experts,
                                 max_experts=max_experts, groups=groups, segments=[n, n])
        experts, experts_mlp = both[:n], both[n:]
    else:
        experts = scores_to_experts(ls.scores, budget, beta=b, higher_gets_more=m.higher_gets_more,
                                    min_experts=min_experts, max_experts=max_experts, groups=groups)
    n_calib = sum(int(x["input_ids"].shape[0]) for x in batches) if (batches and m.needs_data) else 0
    return AllocationResult(method=m.name, scores=[float(s) for s in ls.scores], experts=experts, budget=budget,
                            beta=b, higher_gets_more=m.higher_gets_more, min_experts=min_experts,
                            max_experts=max_experts, groups=groups, calib_examples=n_calib, detail=ls.detail,
                            scores_mlp=None if ls.scores_mlp is None else [float(x) for x in ls.scores_mlp],
                            experts_mlp=experts_mlp)


def layer_params(model, experts: Sequence[int], r: Sequence[int] | int,
                 target_modules: Optional[Sequence[str]] = None,
                 experts_mlp: Optional[Sequence[int]] = None) -> list[int]:
    """Trainable parameters per layer for these expert counts: per targeted projection E·r·(d_in + d_out) + E·d_in,
    the router's E·d_in left out where E = 1 (a one-expert router is frozen: it learns nothing) (``experts_mlp``:
    the count of the layer's MLP projections, when they have their own)."""
    from ..tuner.injection import block_position, module_kind
    from .signals import blocks_of, targeted_linears

    _, blocks = blocks_of(model)
    ranks = [r] * len(blocks) if isinstance(r, int) else list(r)
    out = [0] * len(blocks)
    for name, mod, index in targeted_linears(model, target_modules):
        w = mod.weight
        d_out, d_in = (w.shape if not hasattr(mod, "nf") else (w.shape[1], w.shape[0]))
        e, rk = experts[index], ranks[index]
        if experts_mlp is not None and module_kind(block_position(model, name).rest) == "mlp":
            e = experts_mlp[index]
        out[index] += e * rk * (d_in + d_out) + (e * d_in if e > 1 else 0)
    return out


def result_table(res: AllocationResult, params: Sequence[int]) -> str:
    if res.experts_mlp is not None:
        head = (f"{'layer':>5}  {'attn score':>11}  {'MLP score':>11}  {'attn experts':>12}  {'MLP experts':>11}  "
                f"{'trainable params':>16}")
        lines = [head, "-" * len(head)]
        for i, (s, sm, e, em, p) in enumerate(zip(res.scores, res.scores_mlp, res.experts, res.experts_mlp, params)):
            lines.append(f"{i:>5}  {s:>11.5g}  {sm:>11.5g}  {e:>12}  {em:>11}  {p:>16,}")
        lines.append("-" * len(head))
        lines.append(f"{'total':>5}  {'':>11}  {'':>11}  {sum(res.experts):>12}  {sum(res.experts_mlp):>11}  "
                     f"{sum(params):>16,}")
    else:
        lines = [f"{'layer':>5}  {res.method + ' score':>22}  {'experts':>7}  {'trainable params':>16}",
                 "-" * 57]
        for i, (s, e, p) in enumerate(zip(res.scores, res.experts, params)):
            lines.append(f"{i:>5}  {s:>22.6g}  {e:>7}  {p:>16,}")
        lines.append("-" * 57)
        lines.append(f"{'total':>5}  {'':>22}  {sum(res.experts):>7}  {sum(params):>16,}")
    direction = "higher score -> more experts" if res.higher_gets_more else "lower score -> more experts"
    lines.append(f"E_l ∝ score^{res.beta:g} ({direction}), budget {res.budget}, min {res.min_experts}, max "
                 f"{res.max_experts or '-'}{f', {res.groups} groups' if res.groups else ''}")
    return "\n".join(lines)


def yaml_fragment(res: AllocationResult, model_name: str) -> str:
    """An ``allocation:`` fragment a recipe accepts (the per-layer list), with where it came from."""
    head = (f"# molora allocate --method {res.method} --budget {res.budget} (beta {res.beta:g}, min "
            f"{res.min_experts}, max {res.max_experts or '-'}{f', groups {res.groups}' if res.groups else ''}) on "
            f"{model_name}; scores: " + ", ".join(f"{s:.4g}" for s in res.scores))
    if res.experts_mlp is not None:
        head += "; MLP scores: " + ", ".join(f"{s:.4g}" for s in res.scores_mlp)
        return (f"{head}\nallocation:\n  num_experts: [{', '.join(str(e) for e in res.experts)}]\n"
                f"  num_experts_mlp: [{', '.join(str(e) for e in res.experts_mlp)}]\n")
    return f"{head}\nallocation:\n  num_experts: [{', '.join(str(e) for e in res.experts)}]\n"
