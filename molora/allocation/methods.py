"""The registry of data-driven allocation methods (``molora allocate --method NAME``, ``auto:NAME`` in recipes).

Pure Python (no torch), so recipes are checked before anything heavy loads; each entry names the function that
computes the per-layer scores (``"name"`` in :mod:`molora.allocation.signals`, or ``"package.module:name"``
anywhere), which way a score points (more experts for higher scores, or for lower), whether it needs calibration
data, and a default exponent ``beta``.

How to add a method: a function ``fn(model, batches, *, target_modules=None, **_) -> LayerScores`` in a module of
its own (or in :mod:`.signals`), and ``register_method(AllocationMethod(...))``; ``tests/allocation/test_allocate.py`` runs
every registered method on a tiny model.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AllocationMethod", "METHODS", "get_method", "method_names", "register_method"]


@dataclass(frozen=True)
class AllocationMethod:
    name: str
    #: "name" in molora.allocation.signals or "package.module:name": fn(model, batches, targets) -> LayerScores
    function: str
    higher_gets_more: bool   # True: E_l grows with the score; False: E_l grows as the score falls
    needs_data: bool
    default_beta: float
    summary: str
    #: True: one score per layer *and* sub-block kind (attention, MLP); the allocation sets num_experts (attention)
    #: and num_experts_mlp, and the budget counts per layer as for the others (2 x budget experts in all)
    per_kind: bool = False


METHODS: dict[str, AllocationMethod] = {m.name: m for m in (
    AllocationMethod("block-influence", "block_influence", True, True, 1.0,
                     "ShortGPT block influence 1 - cos(h_in, h_out) on calibration rows: blocks that change the "
                     "hidden state more get more experts"),
    AllocationMethod("attn-mlp", "attn_mlp", True, True, 1.0,
                     "block influence measured separately for the attention and the MLP sub-block of each layer "
                     "(He et al. 2024): attention and MLP projections get their own expert counts",
                     per_kind=True),
    AllocationMethod("alpha-hill", "alpha_hill", True, False, 2.5,
                     "AlphaLoRA: PL alpha-Hill of each targeted weight's eigenvalue spectrum (mean per layer); "
                     "less heavy-tailed (higher alpha, less trained) layers get more experts; no data"),
    AllocationMethod("grad-norm", "grad_norm", True, True, 1.0,
                     "gradient norm of a rank-4 LoRA probe per layer on calibration batches: layers the task "
                     "pulls on harder get more experts"),
)}


def register_method(method: AllocationMethod) -> AllocationMethod:
    """Add an allocation method (a name already taken is an error)."""
    if method.name in METHODS:
        raise ValueError(f"allocation method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> AllocationMethod:
    key = name.strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown allocation method {name!r}; known: {', '.join(method_names())}")
    return METHODS[key]
