"""Merging experts after training: fewer experts per layer, exact where the data allow it, lossy and reported
otherwise (``molora merge-experts``).

1. **Usage** (:func:`expert_loads`): each router group's load per expert on calibration batches (the fraction of
   its top-k selections, or of the gate mass for routers that weight every expert).
2. **Plan** (:func:`plan_groups`, MC-SMoE style, Li et al. 2023 "Merge, Then Compress"): the E' most used experts
   of a layer are the centres; every other expert joins the centre whose router row is the most similar (cosine;
   a data-free stand-in for MC-SMoE's router-logit similarity).
3. **Merge** (:func:`merge_experts`): a centre's A and B become the usage-weighted means of its group's (uniform
   when the group was never used); the router keeps the centres' rows; top-k becomes min(k, E').

Exactness: for a top-k router, removing experts that no token selected leaves every token's chosen experts and
renormalised weights unchanged, so the merged adapter computes the same outputs **on the calibration tokens**
(``exact`` in the report). Other inputs may route to the removed experts, so the command also measures the true
change on held-out tokens (:func:`next_token_scores`, :func:`output_change`: rows not used for calibration) and
calls a merge exact only when those do not move. Routers that route by token id (``hash``: expert = hash(id) mod
E) are refused: fewer experts would send nearly every token elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from molora_kernels import get_layout, get_router

from .layer import MoLoRALayer

__all__ = ["MergeError", "LayerMerge", "expert_loads", "plan_groups", "merge_experts", "next_token_scores",
           "output_change", "EXACT_LOGPROB_TOL"]

#: a merge is exact on held-out tokens when no next-token log-probability moves by more than this (fp32 round-off)
EXACT_LOGPROB_TOL = 1e-4


class MergeError(ValueError):
    """An adapter or target the merge cannot handle (the message says which and why)."""


@dataclass
class LayerMerge:
    """What happened to one layer: experts before/after, the groups (lists of old expert indices, centre first),
    the load per old expert, whether the result is exact on the calibration tokens (``exact``) and on held-out
    tokens (``exact_heldout``: no held-out token used a removed expert; None until measured)."""

    layer: Any
    before: int
    after: int
    groups: list[list[int]] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    exact: bool = True
    exact_heldout: Optional[bool] = None


def _modules(model: nn.Module, adapter: str) -> list[MoLoRALayer]:
    return [m for m in model.modules() if isinstance(m, MoLoRALayer) and adapter in m.molora_A]


@torch.no_grad()
def expert_loads(model: nn.Module, batches: Iterable[dict]) -> dict[Any, list[float]]:
    """Token-weighted mean load per expert of every router group over ``batches`` (dicts of ``input_ids`` and
    ``attention_mask`` [B, T]); the model runs in eval mode."""
    from .summary import _tuner

    tuner = _tuner(model)
    was, asked = model.training, tuner.record_router_stats
    model.eval()
    tuner.record_router_stats = True  # eval-mode forwards record nothing unless asked
    sums: dict[Any, list] = {}
    dev = next(model.parameters()).device
    try:
        for b in batches:
            model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
            for group, s in tuner.router_summary().items():
                load = torch.tensor(s["load"] if s.get("selects_top_k", True) else s["gate_load"],
                                    dtype=torch.float64)
                acc = sums.setdefault(group, [torch.zeros_like(load), 0.0])
                acc[0] += load * s["tokens"]
                acc[1] += s["tokens"]
    finally:
        model.train(was)
        tuner.record_router_stats = asked
    return {g: (acc[0] / max(acc[1], 1e-12)).tolist() for g, acc in sums.items()}


def plan_groups(router_weight: torch.Tensor, load: list[float], target: int) -> list[list[int]]:
    """Groups of old experts, one per kept expert (centre first): the ``target`` most used experts are the centres
    (ties: the lower index); the others join the centre with the most similar router row (cosine)."""
    num_experts = router_weight.shape[0]
    order = sorted(range(num_experts), key=lambda e: (-load[e], e))
    centres = sorted(order[:target])
    w = torch.nn.functional.normalize(router_weight.detach().float(), dim=-1)
    groups = {c: [c] for c in centres}
    for e in order[target:]:
        sims = torch.stack([w[e] @ w[c] for c in centres])
        groups[centres[int(sims.argmax())]].append(e)
    return [groups[c] for c in centres]


def _weights(group: list[int], load: list[float]) -> torch.Tensor:
    f = torch.tensor([load[e] for e in group], dtype=torch.float64)
    return f / f.sum() if float(f.sum()) > 0 else torch.full_like(f, 1.0 / len(group))


@torch.no_grad()
def merge_experts(model: nn.Module, max_experts: int, loads: dict[Any, list[float]],
                  adapter: str = "default") -> list[LayerMerge]:
    """Merge every router group with more than ``max_experts`` experts down to ``max_experts`` (see the module doc),
    in place; updates the adapter config (per-layer ``num_experts`` and ``top_k``, the allocation table) so the
    saved adapter loads as it is. Returns one :class:`LayerMerge` per group."""
    if not isinstance(max_experts, int) or isinstance(max_experts, bool) or max_experts < 1:
        raise MergeError(f"max_experts={max_experts!r} must be an int >= 1")
    modules = _modules(model, adapter)
    if not modules:
        raise MergeError(f"no MoLoRA modules hold adapter {adapter!r}")
    by_group: dict[Any, list[MoLoRALayer]] = {}
    for m in modules:
        by_group.setdefault(m.router_group.get(adapter, m.layer_index), []).append(m)
    split = [g for g in by_group if isinstance(g, str)]
    if split:
        raise MergeError(f"router groups {split[:3]} split attention and MLP (num_experts_mlp); merging is per layer "
                         f"and supports one expert count per layer")
    missing = [g for g in by_group if g not in loads]
    if missing:
        raise MergeError(f"no usage recorded for layer(s) {missing[:5]}: run the calibration batches first")
    report = []
    for group, mods in sorted(by_group.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        m0 = mods[0]
        num_experts, k = m0.num_experts[adapter], m0.top_k[adapter]
        target = min(num_experts, max_experts)
        router = get_router(m0.router_type[adapter])
        if router.needs_token_ids and target < num_experts:
            raise MergeError(f"router {router.name!r} routes each token id to expert hash(id) mod E: with fewer experts "
                             f"nearly every token would go to another expert; merging is not supported for it")
        if router.required_top_k is not None and router.required_top_k > target:
            raise MergeError(f"router {router.name!r} needs top_k={router.required_top_k} <= experts")
        load = [float(v) for v in loads[group]]
        groups = plan_groups(m0.molora_router[adapter], load, target)
        removed_unused = all(load[e] == 0.0 for g in groups for e in g[1:])
        exact = target == num_experts or (router.selects_top_k and router.fixed_k and not router.needs_gates
                                          and removed_unused)
        report.append(LayerMerge(group, num_experts, target, groups, load, exact))
        if target == num_experts:
            continue
        for m in mods:
            _merge_module(m, adapter, groups, load, min(k, target))
    _update_config(model, adapter, modules)
    return report


def _merge_module(m: MoLoRALayer, adapter: str, groups: list[list[int]], load: list[float], top_k: int) -> None:
    r = m.r[adapter]
    lay = get_layout(m.layout.get(adapter, "stacked"))
    a, b, w = m.molora_A[adapter], m.molora_B[adapter], m.molora_router[adapter]
    weights = [_weights(g, load) for g in groups]
    new_b = [sum(fi * b[:, e * r:(e + 1) * r].double() for fi, e in zip(f, g, strict=True)).to(b.dtype)
             for g, f in zip(groups, weights, strict=True)]
    m.molora_A[adapter] = nn.Parameter(lay.merge_a(a, groups, weights, r), requires_grad=a.requires_grad)
    m.molora_B[adapter] = nn.Parameter(torch.cat(new_b, 1), requires_grad=b.requires_grad)
    m.molora_router[adapter] = nn.Parameter(w.detach()[[g[0] for g in groups]].clone(), requires_grad=w.requires_grad)
    m.num_experts[adapter] = len(groups)
    m.top_k[adapter] = top_k
    m.declare_frozen_router(adapter)  # merged down to one expert: its router learns nothing


def _update_config(model: nn.Module, adapter: str, modules: list[MoLoRALayer]) -> None:
    cfg = getattr(model, "peft_config", {}).get(adapter)
    if cfg is None or cfg.allocation is None:
        return
    per_layer = {m.layer_index: (m.num_experts[adapter], m.top_k[adapter]) for m in modules}
    rows = []
    for row in cfg.allocation:
        e, k = per_layer.get(row.get("layer"), (row["num_experts"], row["top_k"]))
        rows.append({**row, "num_experts": e, "top_k": k})
    cfg.allocation = rows
    if cfg.num_layers is None:
        cfg.num_experts, cfg.top_k = rows[0]["num_experts"], rows[0]["top_k"]
    else:
        cfg.num_experts = [row["num_experts"] for row in rows]
        cfg.top_k = [row["top_k"] for row in rows]
    cfg.expert_budget = None


@torch.no_grad()
def next_token_scores(model: nn.Module, batches: Iterable[dict]) -> list[dict[str, torch.Tensor]]:
    """Per batch (dicts of ``input_ids`` / ``attention_mask`` [B, T]), on the CPU, for every real next token
    (positions t whose t + 1 is a real token): ``logit`` [N] of that token, ``logprob`` [N] (log-softmax over the
    vocabulary, float32) and ``argmax`` [N] (the model's top token). Small enough to keep for a whole calibration
    set; :func:`output_change` compares two of them. The model runs in eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for b in batches:
            ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            keep = (mask[:, :-1] * mask[:, 1:]).bool()
            target = ids[:, 1:][keep]
            lg = logits[keep]
            out.append({"logit": lg.gather(-1, target[:, None])[:, 0].cpu(),
                        "logprob": torch.log_softmax(lg, -1).gather(-1, target[:, None])[:, 0].cpu(),
                        "argmax": lg.argmax(-1).cpu()})
    finally:
        model.train(was)
    return out


def output_change(before: list[dict], after: list[dict]) -> dict[str, float]:
    """How far two :func:`next_token_scores` of the same batches differ: ``tokens``, ``max_abs_logit`` and
    ``max_abs_logprob`` / ``mean_abs_logprob`` (of the next token), ``argmax_changed`` (fraction of tokens whose
    top prediction changed) and ``exact`` (max_abs_logprob <= :data:`EXACT_LOGPROB_TOL`)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} batches before, {len(after)} after")
    cat = {k: (torch.cat([b[k] for b in before]), torch.cat([a[k] for a in after]))
           for k in ("logit", "logprob", "argmax")}
    n = int(cat["logit"][0].numel())
    if n == 0:
        return {"tokens": 0, "max_abs_logit": 0.0, "max_abs_logprob": 0.0, "mean_abs_logprob": 0.0,
                "argmax_changed": 0.0, "exact": True}
    d_logit = (cat["logit"][0] - cat["logit"][1]).abs()
    d_lp = (cat["logprob"][0] - cat["logprob"][1]).abs()
    worst = float(d_lp.max())
    return {"tokens": n, "max_abs_logit": float(d_logit.max()), "max_abs_logprob": worst,
            "mean_abs_logprob": float(d_lp.mean()),
            "argmax_changed": float((cat["argmax"][0] != cat["argmax"][1]).float().mean()),
            "exact": worst <= EXACT_LOGPROB_TOL}
