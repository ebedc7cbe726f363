"""Router diagnostics after training: per layer, dead and dominant experts, near-uniform routing, and what to
change in the allocation. Read from the router telemetry in ``metrics.jsonl`` (``molora report`` prints them,
writes ``plots/router_diagnostics.json`` and marks them on ``expert_load.png``).

The state judged is the end of training: the token-weighted mean over the last third of the logging intervals.
For a layer with E experts and top-k routing, the load of expert e is its share of the layer's top-k selections
(uniform: 1/E). Thresholds (heuristics, stated in every message):

* **dead**: load < ``DEAD`` / E (a quarter of the uniform share): the expert is rarely chosen; dropping it costs
  little. Suggestion: E - (dead experts), never below top-k.
* **dominant**: load > ``DOMINANT`` / E (twice the uniform share): the router leans on it; the layer may want
  more capacity there. Suggestion: +1 expert when the layer has dominant and no dead experts.
* **near-uniform**: normalised router entropy (of each token's softmax over the E experts, mean over tokens) >=
  ``UNIFORM_ENTROPY``: every token's router probabilities are nearly equal, so which k experts it gets is decided
  by small differences and the renormalised gates weight them about equally: the router has not specialised,
  the mixture acts like one wide LoRA of rank E·r, and the routing says nothing yet about where experts help.
* **E = top-k**: every expert is used on every token; routing only weights them (no load signal at all).
* **dropping**: a capacity router (``switch``, ``expert_choice``) left more than ``DROPPED`` of the layer's tokens
  to no expert (they get the frozen layer only). Reported beside the state; the remedy is a larger
  ``router_options.capacity_factor`` (or, for right-padded batches, packing: padding takes capacity too).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["LayerDiagnosis", "diagnose", "diagnosis_text", "DEAD", "DOMINANT", "UNIFORM_ENTROPY", "DROPPED"]

DEAD = 0.25
DOMINANT = 2.0
UNIFORM_ENTROPY = 0.95
DROPPED = 0.01


@dataclass
class LayerDiagnosis:
    layer: Optional[int]
    num_experts: int
    top_k: int
    load: list[float]
    entropy_norm: Optional[float]
    imbalance: float
    dead: list[int] = field(default_factory=list)
    dominant: list[int] = field(default_factory=list)
    state: str = "ok"            # "all-used" (E = k), "near-uniform", "dead", "dominant", "ok", "single"
    suggested_experts: int = 0
    note: str = ""
    #: fraction of the layer's tokens no expert computed (capacity routers; None: not in the telemetry)
    dropped: Optional[float] = None


def _window(routers: list[dict]) -> list[dict]:
    n = len(routers)
    return routers[max(0, n - max(1, n // 3)):]


def diagnose(run: dict[str, Any]) -> list[LayerDiagnosis]:
    """Diagnoses per layer from a run loaded with :func:`molora.run.report.load_run` (empty without telemetry)."""
    routers = [r["router"] for r in run["train"] if r.get("router") and r["router"].get("layers")]
    if not routers:
        return []
    window = _window(routers)
    last = routers[-1]
    out = []
    for i, layer in enumerate(last["layers"]):
        e, k = int(last["num_experts"][i]), int(last["top_k"][i])
        load = [0.0] * e
        ent, w_sum, drop, drop_w = 0.0, 0.0, 0.0, 0.0
        for r in window:
            if layer not in r["layers"]:
                continue
            j = r["layers"].index(layer)
            w = float(r["tokens"][j]) or 1.0
            for x, v in enumerate(r["load"][j][:e]):
                load[x] += v * w
            if r.get("entropy_norm") and r["entropy_norm"][j] is not None:
                ent += float(r["entropy_norm"][j]) * w
            if r.get("dropped"):
                drop += float(r["dropped"][j]) * w
                drop_w += w
            w_sum += w
        load = [v / w_sum for v in load] if w_sum else load
        ent_n = ent / w_sum if w_sum else None
        imb = max(load) * e if load else 0.0
        d = LayerDiagnosis(layer=layer, num_experts=e, top_k=k, load=[round(v, 4) for v in load],
                           entropy_norm=None if ent_n is None else round(ent_n, 4), imbalance=round(imb, 3),
                           suggested_experts=e, dropped=round(drop / drop_w, 4) if drop_w else None)
        if e == 1:
            d.state = "single"
        elif e <= k:
            d.state = "all-used"
        else:
            d.dead = [x for x, v in enumerate(load) if v < DEAD / e]
            d.dominant = [x for x, v in enumerate(load) if v > DOMINANT / e]
            if d.dead:
                d.state = "dead"
                d.suggested_experts = max(k, e - len(d.dead))
                d.note = (f"{len(d.dead)} of {e} experts take < {DEAD:g}/E of the selections: could drop "
                          f"{e - d.suggested_experts}")
            elif d.dominant:
                d.state = "dominant"
                d.suggested_experts = e + 1
                d.note = (f"expert(s) {d.dominant} take > {DOMINANT:g}/E of the selections: the layer may want "
                          f"more capacity (+1)")
            elif ent_n is not None and ent_n >= UNIFORM_ENTROPY:
                d.state = "near-uniform"
        if d.dropped is not None and d.dropped > DROPPED:
            d.note = "; ".join(filter(None, [d.note, f"{100 * d.dropped:.1f}% of its tokens got no expert (over "
                                                     f"capacity): raise router_options.capacity_factor"]))
        out.append(d)
    return out


def diagnosis_text(diags: list[LayerDiagnosis]) -> str:
    """The per-layer lines and one summary of what the routing implies."""
    if not diags:
        return "router diagnostics: no router telemetry in this run"
    routed = [d for d in diags if d.state not in ("single", "all-used")]
    lines = ["router diagnostics (end of training: last third of the logging intervals; thresholds: dead < "
             f"{DEAD:g}/E of the selections, dominant > {DOMINANT:g}/E, near-uniform router entropy >= "
             f"{UNIFORM_ENTROPY}; all-used: E = top_k, every expert on every token; single: E = 1):"]
    for d in diags:
        ent = "-" if d.entropy_norm is None else f"{d.entropy_norm:.3f}"
        change = d.suggested_experts - d.num_experts
        sug = f" -> suggest {d.suggested_experts} ({change:+d})" if change else ""
        dropped = f" dropped {100 * d.dropped:.1f}%" if d.dropped else ""
        lines.append(f"  layer {d.layer}: E={d.num_experts} k={d.top_k} entropy {ent} max load x E "
                     f"{d.imbalance:.2f}{dropped}  {d.state}{sug}" + (f"  ({d.note})" if d.note else ""))
    dropping = [d for d in diags if d.dropped is not None and d.dropped > DROPPED]
    if dropping:
        worst = max(dropping, key=lambda d: d.dropped)
        lines.append(f"capacity: {len(dropping)} layer(s) leave more than {100 * DROPPED:g}% of their tokens to no "
                     f"expert (worst: layer {worst.layer}, {100 * worst.dropped:.1f}%); those tokens train and run "
                     f"without an adapter. Raise router_options.capacity_factor, or pack sequences (padding takes "
                     f"capacity too).")
    uniform = [d for d in routed if d.state == "near-uniform"]
    if routed and len(uniform) >= 0.75 * len(routed):
        ents = [d.entropy_norm for d in uniform if d.entropy_norm is not None]
        which = "every routed layer routes" if len(uniform) == len(routed) else \
            f"{len(uniform)} of {len(routed)} routed layers route"
        lines.append(f"summary: {which} near-uniformly (router entropy {min(ents):.3f}-"
                     f"{max(ents):.3f}): the routers have not specialised, so this run does not show where experts "
                     f"help, and each mixture behaves like one LoRA of rank E·r. Fewer experts per layer would "
                     f"likely do as well at this training length; train longer to let the routers specialise, or "
                     f"compare allocations directly with `molora sweep`.")
    else:
        drop = sum(d.num_experts - d.suggested_experts for d in diags if d.suggested_experts < d.num_experts)
        add = sum(d.suggested_experts - d.num_experts for d in diags if d.suggested_experts > d.num_experts)
        lines.append(f"summary: {len(uniform)} of {len(routed)} routed layers near-uniform; suggested changes: "
                     f"drop {drop} dead expert(s), add {add} where one expert dominates (heuristics; check with "
                     f"`molora sweep`).")
    return "\n".join(lines)


def as_json(diags: list[LayerDiagnosis]) -> list[dict[str, Any]]:
    return [asdict(d) for d in diags]
