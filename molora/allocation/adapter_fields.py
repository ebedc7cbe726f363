"""The fields of a MoLoRA adapter, in one place: their types, defaults, help and checks.

:class:`AdapterFields` is what a user sets about an adapter. ``MoLoRAConfig`` (the PEFT config) inherits it and adds
what molora fills in itself (the resolved allocation table, the layer count, the output fingerprint); a recipe's
``allocation:`` section is built from it (:func:`recipe_fields`), so a new field reaches ``MoLoRAConfig``, recipes,
``molora train --validate`` and the recipe key list without further edits. Every check lives here too, once:
:func:`check_field` (one value) and :func:`check_together` (the fields that constrain each other), both raising
:class:`~molora.allocation.specs.AllocationError` naming the value and what is allowed. ``MoLoRAConfig`` calls both
when it is built; the recipe calls them as field and model validators, so a typo fails before torch is imported.

Pure Python (no torch): the recipe validator imports this module.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

from .expert_inits import expert_init_names
from .mapping import is_auto
from .specs import AllocationError, auto_method, router_names_of, router_registry, validate_spec

__all__ = ["AdapterFields", "AUX_LOSS_MODES", "ROUTER_INITS", "expert_init_names", "check_field", "check_together",
           "check_all", "recipe_fields", "field_help"]

Spec = Union[int, list[int], str]
AUX_LOSS_MODES = ("masked", "original")
ROUTER_INITS = ("kaiming", "zeros")


def _f(default: Any, help: str, recipe: Any = ..., **checks: Any) -> Any:
    """A field: ``help`` (one line, shown in recipe key lists), ``recipe`` (the recipe's default when it differs
    from the config's, e.g. MoLA's ▽ instead of 4), ``checks`` for :func:`check_field` (``choices``)."""
    meta = {"help": help, **checks}
    if recipe is not ...:
        meta["recipe_default"] = recipe
    return field(default=default, metadata=meta)


@dataclass
class AdapterFields:
    """What a user sets about a MoLoRA adapter (see ``MoLoRAConfig`` for each field's full description)."""

    num_experts: Spec = _f(4, "experts per layer: int, per-layer list, block notation '2,4,6,8', preset (▽ □ △ ⋈ ◇) "
                              "or auto:METHOD", recipe="2,4,6,8")
    top_k: Spec = _f(2, "experts each token is routed to (int, per-layer list or block notation)")
    r: Spec = _f(8, "rank of every expert of a layer (int, per-layer list or block notation)")
    expert_budget: Optional[int] = _f(None, "total experts over all layers (scales num_experts' shape to it)")
    num_experts_mlp: Optional[Spec] = _f(None, "experts of the MLP projections per layer (None: num_experts)")
    lora_alpha: float = _f(16, "LoRA alpha (each layer's scaling is alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the experts' input, in [0, 1)", recipe=0.05)
    target_modules: Optional[Union[list[str], str]] = _f(None, "module names (suffix match) or a regex; None: "
                                                               "every attention and MLP projection")
    exclude_modules: Optional[Union[list[str], str]] = _f(None, "module names or a regex never adapted")
    router: Union[str, list[str]] = _f("topk", "a registered router, 'topk,topp' for groups of layers, or one per "
                                               "layer")
    router_options: Optional[dict[str, float]] = _f(None, "the routers' options, e.g. {top_p: 0.8}")
    aux_loss_coef: float = _f(0.001, "weight of the load-balancing loss (0 disables it)")
    aux_loss_mode: str = _f("masked", "masked (padding excluded) or original (MoLA's code: every position)",
                            choices=AUX_LOSS_MODES)
    backend: str = _f("auto", "MoE-LoRA op backend (auto picks per shape)")
    layout: str = _f("stacked", "expert layout: stacked (MoLA) or shared_a (HydraLoRA)")
    share_sibling_shrink: bool = _f(True, "q/k/v and gate/up compute one shrink + router GEMM (one dropout mask)")
    init_weights: bool = _f(True, "MoLA init (B = 0); False: random B (tests)")
    router_init: str = _f("kaiming", "kaiming (MoLA) or zeros (every token starts uniform)", choices=ROUTER_INITS)
    expert_init: str = _f("kaiming", "kaiming (MoLA), orthogonal (experts start on disjoint input directions) or svd "
                                     "(on the base weight's top singular directions); molora.allocation.expert_inits",
                          choices=expert_init_names)
    shared_expert_r: int = _f(0, "rank of an always-on shared expert beside the routed ones (0: none)")
    modules_to_save: Optional[list[str]] = _f(None, "extra modules trained and saved in full (e.g. a "
                                                    "classification head)")


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(AdapterFields))


def field_help(name: str) -> str:
    return AdapterFields.__dataclass_fields__[name].metadata["help"]


# ------------------------------------------------------------------------------------------------------ checks


def _backends() -> tuple[str, ...]:
    return ("auto", *router_registry().ALL_BACKENDS)


def _names(v: Any, name: str) -> None:
    if v is None or isinstance(v, str):
        return
    if isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in v):
        if not v and name == "target_modules":
            raise AllocationError("target_modules=[] matches nothing; give module names like ['q_proj', 'v_proj'], "
                                  "a regex, or None for every attention and MLP projection")
        return
    raise AllocationError(f"{name}={v!r}: give module names (a list of strings), a regex, or None")


def _number(v: Any, name: str, low: float, *, low_open: bool = False, high: Optional[float] = None) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        rng = f"in [{low:g}, {high:g})" if high is not None else f"a finite number {'>' if low_open else '>='} {low:g}"
        raise AllocationError(f"{name}={v!r} must be {rng}")


def check_field(name: str, v: Any) -> None:
    """Check one field's value on its own (AllocationError naming the value and what is allowed)."""
    meta = AdapterFields.__dataclass_fields__[name].metadata
    if "choices" in meta:
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]  # a registry: read now
        if v not in choices:
            raise AllocationError(f"{name}={v!r}; allowed: {', '.join(choices)}")
    elif name in ("num_experts", "num_experts_mlp", "top_k", "r"):
        if v is None and name == "num_experts_mlp":
            return
        validate_spec(list(v) if isinstance(v, tuple) else v, name, allow_preset=name.startswith("num_experts"))
        if is_auto(v):
            from .methods import get_method

            try:
                get_method(auto_method(v))
            except ValueError as e:
                raise AllocationError(f"{name}={v!r}: {e}") from None
    elif name == "expert_budget":
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise AllocationError(f"expert_budget={v!r} must be a positive int (total experts)")
    elif name == "lora_alpha":
        _number(v, name, 0, low_open=True)
    elif name == "lora_dropout":
        _number(v, name, 0, high=1)
    elif name == "aux_loss_coef":
        _number(v, name, 0)
    elif name in ("target_modules", "exclude_modules", "modules_to_save"):
        _names(v, name)
    elif name == "router":
        router_names_of(v)
    elif name == "router_options":
        if v is not None and not isinstance(v, Mapping):
            raise AllocationError(f"router_options={v!r}: give a mapping of option names to numbers")
    elif name == "backend":
        if v not in _backends():
            raise AllocationError(f"backend={v!r} is not a known backend; allowed: {', '.join(_backends())}")
    elif name == "layout":
        from molora_kernels.layouts import get_layout  # pure Python, like the router registry

        try:
            get_layout(v)
        except ValueError as e:
            raise AllocationError(str(e)) from None
    elif name in ("share_sibling_shrink", "init_weights"):
        if not isinstance(v, bool):
            raise AllocationError(f"{name}={v!r} must be true or false")
    elif name == "shared_expert_r":
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AllocationError(f"shared_expert_r={v!r} must be an int >= 0 (0: no shared expert)")
    else:  # a new field needs its check here (a test runs every field through this function)
        raise AssertionError(f"no check for adapter field {name!r}")


def check_together(values: Any) -> None:
    """Checks between fields, on an object with the fields as attributes (a ``MoLoRAConfig``, a recipe's
    allocation section), after each passed :func:`check_field`."""
    from molora_kernels.layouts import get_layout

    reg = router_registry()
    names = router_names_of(values.router)
    try:
        reg.options_for(names, values.router_options)
    except ValueError as e:
        raise AllocationError(str(e)) from None
    routers = [reg.get_router(n) for n in dict.fromkeys(names)]
    backend = values.backend
    if backend != "auto":
        for router in routers:
            if backend not in router.backends:
                raise AllocationError(f"backend={backend!r} does not implement router={router.name!r}; backends for "
                                      f"it: {', '.join(router.backends)} (or 'auto')")
        lay = get_layout(values.layout)
        if backend not in lay.backends:
            raise AllocationError(f"backend={backend!r} does not implement layout={values.layout!r}; backends for "
                                  f"it: {', '.join(lay.backends)} (or 'auto')")
    if values.num_experts_mlp is not None and is_auto(values.num_experts):
        raise AllocationError(f"num_experts_mlp={values.num_experts_mlp!r} with num_experts={values.num_experts!r}: "
                              f"an auto: allocation sets the counts itself (auto:attn-mlp sets both); drop "
                              f"num_experts_mlp")
    k, e = values.top_k, values.num_experts
    if (all(r.selects_top_k for r in routers) and isinstance(e, int) and isinstance(k, int)
            and not isinstance(e, bool) and k > e and values.expert_budget is None):
        raise AllocationError(f"top_k={k} is larger than num_experts={e}; top_k must be between 1 and the number of "
                              f"experts")


def check_all(values: Any) -> None:
    """:func:`check_field` for every field, then :func:`check_together`."""
    for name in FIELD_NAMES:
        check_field(name, getattr(values, name))
    check_together(values)


# ------------------------------------------------------------------------------------------------------ recipes


def recipe_fields() -> dict[str, tuple[Any, Any]]:
    """``{name: (annotation, pydantic Field)}`` for a recipe's allocation section: every field of
    :class:`AdapterFields` with its type, its recipe default and its help as the description."""
    from pydantic import Field

    hints = typing.get_type_hints(AdapterFields)
    out = {}
    for f in fields(AdapterFields):
        default = f.metadata.get("recipe_default", f.default)
        out[f.name] = (hints[f.name], Field(default, description=f.metadata["help"]))
    return out
