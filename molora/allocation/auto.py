"""Data-driven allocation end to end: ``molora allocate`` and ``allocation.num_experts: auto:METHOD``.

:func:`allocate` runs a registered signal (:mod:`.methods`, :mod:`.signals`) on a model and calibration batches
and maps the scores to experts (:func:`.mapping.scores_to_experts`); :func:`resolve_recipe_auto` does it for a
recipe before injection, caching the result by model + data fingerprint (``$MOLORA_CACHE`` or
``~/.cache/molora``/allocations), so a second run (or every rank of a DeepSpeed run) gets the identical
allocation without recomputing. Under ``torch.distributed`` rank 0 computes (or reads the cache) and broadcasts.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .mapping import scores_to_experts
from .methods import AllocationMethod, get_method
from .specs import auto_method, is_auto

__all__ = ["AllocationResult", "allocate", "allocate_for_recipe", "calibration_batches", "resolve_recipe_auto",
           "cache_dir",
           "layer_params", "result_table", "yaml_fragment"]


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


def calibration_batches(rows: Sequence[dict], tokenizer, template, cutoff_len: int, examples: int,
                        batch_size: int = 8, seed: int = 0, train_on_inputs: bool = True) -> list[dict]:
    """``examples`` training rows (a seeded sample) as padded batches with labels (the model's training view)."""
    import random

    from ..data import DataCollator, build_dataset

    if examples < 1:
        raise ValueError(f"calib-examples={examples} must be >= 1")
    rows = list(rows)
    idx = sorted(random.Random(seed).sample(range(len(rows)), min(examples, len(rows))))
    ds = build_dataset([rows[i] for i in idx], tokenizer, template, cutoff_len, train_on_inputs)
    collate = DataCollator(pad_token_id=tokenizer.pad_token_id)
    return [collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))]) for i in range(0, len(ds), batch_size)]


def allocate(model, method: str, budget: int, *, batches: Optional[Sequence[dict]] = None,
             beta: Optional[float] = None, min_experts: int = 1, max_experts: Optional[int] = None,
             groups: Optional[int] = None, target_modules: Optional[Sequence[str]] = None) -> AllocationResult:
    """Scores of ``method`` on ``model`` (and ``batches``) mapped to ``budget`` experts (see the module doc)."""
    from . import signals

    m: AllocationMethod = get_method(method)
    if m.needs_data and not batches:
        raise ValueError(f"method {m.name!r} needs calibration rows (the recipe's training data)")
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
    """Trainable parameters per layer for these expert counts: per targeted projection E·r·(d_in + d_out) + E·d_in
    (``experts_mlp``: the count of the layer's MLP projections, when they have their own)."""
    from ..injection import block_position, module_kind
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
        out[index] += e * rk * (d_in + d_out) + e * d_in
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


# ------------------------------------------------------------------------------------------------ recipes


def cache_dir() -> Path:
    root = os.environ.get("MOLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "molora")
    return Path(root) / "allocations"


def _model_fingerprint(model) -> str:
    cfg = getattr(model, "config", None)
    text = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)
    h = hashlib.sha256(text.encode())
    # a cheap weight fingerprint: the first values of every 16th parameter (distinguishes checkpoints of one config)
    for i, (name, p) in enumerate(model.named_parameters()):
        if i % 16 == 0:
            h.update(name.encode())
            h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def resolve_recipe_auto(recipe, model, tokenizer, train_rows: Sequence[dict], *, is_main: bool = True,
                        log=print) -> Optional[dict[str, Any]]:
    """For ``allocation.num_experts: auto:METHOD``: compute (or read from the cache) the per-layer expert
    counts for this model and these training rows, and return ``{"num_experts": [...], "result": {...},
    "cached": bool}`` (None when the recipe's allocation is not ``auto:``). Call before injection."""
    a = recipe.allocation
    if not is_auto(a.num_experts):
        return None
    from ..resume import rows_sha256

    method = get_method(auto_method(a.num_experts))
    if a.expert_budget is None:
        raise ValueError(f"allocation.num_experts={a.num_experts!r} needs allocation.expert_budget")
    min_experts = auto_min_experts(a)
    settings = {"method": method.name, "budget": a.expert_budget, "beta": a.auto_beta, "min": min_experts,
                "max": a.auto_max, "groups": a.auto_groups, "calib_examples": a.auto_calib_examples,
                "target_modules": a.target_modules, "cutoff_len": recipe.data.cutoff_len,
                "prompt_template": recipe.data.prompt_template, "seed": recipe.train.seed}
    key_src = json.dumps({"model": _model_fingerprint(model), "settings": settings,
                          "data": rows_sha256(train_rows) if method.needs_data else None}, sort_keys=True,
                         default=str)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = cache_dir() / f"{method.name}-{key}.json"
    payload = None
    if _rank() == 0:
        if path.is_file():
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
                payload["cached"] = True
            except (OSError, ValueError):
                payload = None
        if payload is None:
            res = allocate_for_recipe(recipe, model, tokenizer, train_rows, method.name, a.expert_budget,
                                      beta=a.auto_beta, min_experts=min_experts, max_experts=a.auto_max,
                                      groups=a.auto_groups, calib_examples=a.auto_calib_examples)
            payload = {"num_experts": res.experts, "num_experts_mlp": res.experts_mlp, "result": res.to_dict(),
                       "settings": settings, "key": key, "cached": False}
            _write_atomic(path, payload)
    payload = _broadcast(payload)
    if is_main:
        src = f"cache {path}" if payload.get("cached") else f"computed, cached in {path}"
        mlp = payload.get("num_experts_mlp")
        log(f"molora: allocation {a.num_experts} with budget {a.expert_budget} ({src}): "
            + (f"{payload['num_experts']}" if mlp is None else
               f"attention {payload['num_experts']}, MLP {mlp}"))
    return payload


def allocate_for_recipe(recipe, model, tokenizer, train_rows: Sequence[dict], method: str, budget: int, *,
                        beta: Optional[float], min_experts: Optional[int], max_experts: Optional[int],
                        groups: Optional[int], calib_examples: int) -> AllocationResult:
    """:func:`allocate` with the recipe's calibration rows (prompt template, cutoff, seed), target modules and
    default minimum (``min_experts=None``: top-k, see :func:`auto_min_experts`); shared by ``molora allocate``
    and ``auto:`` recipes."""
    from ..data import PromptTemplate

    a = recipe.allocation
    batches = None
    if get_method(method).needs_data:
        batches = calibration_batches(train_rows, tokenizer, PromptTemplate(recipe.data.prompt_template),
                                      recipe.data.cutoff_len, calib_examples, seed=recipe.train.seed,
                                      train_on_inputs=recipe.data.train_on_inputs)
    targets = a.target_modules if isinstance(a.target_modules, list) else None
    lo = min_experts if min_experts is not None else auto_min_experts(a)
    return allocate(model, method, budget, batches=batches, beta=beta, min_experts=lo, max_experts=max_experts,
                    groups=groups, target_modules=targets)


def auto_min_experts(a) -> int:
    """The per-layer minimum of an ``auto:`` allocation section: ``auto_min``, or top-k (every layer needs at
    least top-k experts) when top-k is one int, else 1."""
    if a.auto_min is not None:
        return a.auto_min
    return a.top_k if isinstance(a.top_k, int) and a.router == "topk" else 1


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # noqa: BLE001
        pass
    return 0


def _broadcast(obj):
    """Rank 0's object on every rank (identity without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
