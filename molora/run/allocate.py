"""Allocations a recipe asks for: ``molora allocate RECIPE`` and ``allocation.num_experts: auto:METHOD``.

:func:`allocate_for_recipe` runs :func:`molora.allocation.auto.allocate` on the recipe's calibration rows (its
prompt template, cutoff, seed), target modules and default minimum; :func:`resolve_recipe_auto` does it before
injection, caching the result by model + data fingerprint (``$MOLORA_CACHE`` or ``~/.cache/molora``/allocations),
so a second run (or every rank of a DeepSpeed run) gets the identical allocation without recomputing. Under
``torch.distributed`` rank 0 computes (or reads the cache) and broadcasts.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from ..allocation.auto import AllocationResult, allocate
from ..allocation.methods import get_method
from ..allocation.specs import auto_method, is_auto

__all__ = ["calibration_batches", "allocate_for_recipe", "auto_min_experts", "resolve_recipe_auto", "cache_dir"]


def calibration_batches(rows: Sequence[dict], tokenizer, template, cutoff_len: int, examples: int,
                        batch_size: int = 8, seed: int = 0, train_on_inputs: bool = True) -> list[dict]:
    """``examples`` training rows (a seeded sample) as padded batches with labels (the model's training view)."""
    import random

    from .data import DataCollator, build_dataset

    if examples < 1:
        raise ValueError(f"calib-examples={examples} must be >= 1")
    rows = list(rows)
    idx = sorted(random.Random(seed).sample(range(len(rows)), min(examples, len(rows))))
    ds = build_dataset([rows[i] for i in idx], tokenizer, template, cutoff_len, train_on_inputs)
    collate = DataCollator(pad_token_id=tokenizer.pad_token_id)
    return [collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))]) for i in range(0, len(ds), batch_size)]




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
    from .resume import rows_sha256

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
            from ..allocation.signals import blocks_of

            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
                problem = cached_allocation_problem(payload, key, settings, len(blocks_of(model)[1]))
            except (OSError, ValueError) as e:
                problem = f"unreadable ({e})"
            if problem:
                log(f"molora: warning: ignoring the cached allocation {path}: {problem}; computing it again")
                payload = None
            else:
                payload["cached"] = True
        if payload is None:
            res = allocate_for_recipe(recipe, model, tokenizer, train_rows, method.name, a.expert_budget,
                                      beta=a.auto_beta, min_experts=min_experts, max_experts=a.auto_max,
                                      groups=a.auto_groups, calib_examples=a.auto_calib_examples)
            payload = {"num_experts": res.experts, "num_experts_mlp": res.experts_mlp, "result": res.to_dict(),
                       "settings": settings, "key": key, "cached": False}
            try:
                _write_atomic(path, payload)
            except OSError as e:  # a read-only or full cache must not stop a run that has its allocation
                log(f"molora: warning: could not cache the allocation in {path} ({e}); it is computed again "
                    f"next time (set MOLORA_CACHE to a writable folder)")
    payload = _broadcast(payload)
    if is_main:
        src = f"cache {path}" if payload.get("cached") else f"computed, cached in {path}"
        mlp = payload.get("num_experts_mlp")
        log(f"molora: allocation {a.num_experts} with budget {a.expert_budget} ({src}): "
            + (f"{payload['num_experts']}" if mlp is None else
               f"attention {payload['num_experts']}, MLP {mlp}"))
    return payload


def cached_allocation_problem(payload: Any, key: str, settings: dict, num_layers: int) -> Optional[str]:
    """Why a cached ``auto:`` entry cannot be used for this model, data and settings (None when it can): it must be
    the JSON object this version writes, for this key and these settings, with one count per layer within the
    bounds and summing to the budget (an edited file is never trusted blindly)."""
    if not isinstance(payload, dict):
        return f"not a JSON object ({type(payload).__name__})"
    if payload.get("key") != key:
        return f"its key {payload.get('key')!r} is not this model's and data's {key!r}"
    if payload.get("settings") != json.loads(json.dumps(settings, default=str)):
        return "it was computed with other settings"
    lo, hi, budget = settings["min"], settings["max"], settings["budget"]
    for name in ("num_experts", "num_experts_mlp"):
        counts = payload.get(name)
        if counts is None and name == "num_experts_mlp":
            continue
        if not (isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts)):
            return f"{name} is not a list of ints"
        if len(counts) != num_layers:
            return f"{name} has {len(counts)} entries for a model of {num_layers} layers"
        if any(c < max(1, lo or 1) or (hi is not None and c > hi) for c in counts):
            return f"{name} {counts} leaves the bounds [{lo}, {hi}]"
        if sum(counts) != budget:
            return f"{name} sums to {sum(counts)}, not the budget {budget}"
    return None


def allocate_for_recipe(recipe, model, tokenizer, train_rows: Sequence[dict], method: str, budget: int, *,
                        beta: Optional[float], min_experts: Optional[int], max_experts: Optional[int],
                        groups: Optional[int], calib_examples: int) -> AllocationResult:
    """:func:`allocate` with the recipe's calibration rows (prompt template, cutoff, seed), target modules and
    default minimum (``min_experts=None``: top-k, see :func:`auto_min_experts`); shared by ``molora allocate``
    and ``auto:`` recipes."""
    from .data import PromptTemplate

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
    from ..allocation.specs import router_names_of, selects_top_k

    bounded = all(selects_top_k(n) for n in router_names_of(a.router))
    return a.top_k if isinstance(a.top_k, int) and bounded else 1


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
