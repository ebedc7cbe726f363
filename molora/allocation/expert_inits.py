"""The registry of expert initialisations (``allocation.expert_init``): how a layer's stacked A starts.

Pure Python (no torch), so a recipe's ``expert_init`` is checked before anything heavy loads; each entry names the
function that fills A (``"name"`` in :mod:`molora.tuner.expert_init`, or ``"package.module:name"`` anywhere). Every
init leaves B = 0, so the adapted model starts exactly as the base model whatever A is.

How to add one: a function ``fn(a, *, rank, base_weight, module_name) -> None`` that fills ``a`` (the A parameter,
``[rows, d_in]``: ``rows = E·r`` for the stacked layout, ``r`` for ``shared_a``; expert ``e`` reads rows
``[e·r, (e+1)·r)``) in place; ``base_weight()`` returns the frozen base weight as float ``[d_out, d_in]`` (only
call it if you need it: it dequantizes 4/8-bit weights). Then ``register_expert_init(ExpertInit(...))``;
``tests/tuner/test_levers.py`` runs every registered init on a tiny model.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ExpertInit", "EXPERT_INIT_REGISTRY", "get_expert_init", "expert_init_names", "register_expert_init"]


@dataclass(frozen=True)
class ExpertInit:
    name: str
    #: "name" in molora.tuner.expert_init or "package.module:name": fn(a, *, rank, base_weight, module_name)
    function: str
    summary: str
    #: True: the init reads the base weight (refused where it cannot be read, e.g. partitioned under ZeRO-3)
    reads_base_weight: bool = False


EXPERT_INIT_REGISTRY: dict[str, ExpertInit] = {}


def register_expert_init(init: ExpertInit) -> ExpertInit:
    if init.name in EXPERT_INIT_REGISTRY:
        raise ValueError(f"expert init {init.name!r} is already registered")
    EXPERT_INIT_REGISTRY[init.name] = init
    return init


def expert_init_names() -> tuple[str, ...]:
    return tuple(EXPERT_INIT_REGISTRY)


def get_expert_init(name: str) -> ExpertInit:
    try:
        return EXPERT_INIT_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown expert_init {name!r}; registered: {', '.join(EXPERT_INIT_REGISTRY)}") from None


register_expert_init(ExpertInit(
    "kaiming", "kaiming",
    "MoLA: every expert's A drawn independently, kaiming-uniform(a=sqrt(5))"))
register_expert_init(ExpertInit(
    "orthogonal", "orthogonal",
    "the stacked A has orthogonal rows of kaiming's expected norm: experts start on disjoint random input "
    "directions (diversified initial experts)"))
register_expert_init(ExpertInit(
    "svd", "svd",
    "PiSSA-style warm start: the rows of A are the base weight's top right singular vectors (expert e takes "
    "directions e, e+E, e+2E, ...), of kaiming's norm; B = 0 and the base weight is left as it is",
    reads_base_weight=True))
