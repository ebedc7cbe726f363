"""molora_kernels: the tensor ops of molora (torch + optional Triton, no transformers).

Installed as ``molora_kernels`` (the repository folder is ``kernels/``). Never import this as a top-level
``kernels`` module: transformers probes that name for the Hugging Face Hub kernels library.

Public API:
    ROUTERS / get_router / register_router -> the router registry (molora_kernels.routers)
    LAYOUTS / get_layout / register_layout -> the expert-layout registry (molora_kernels.layouts)
    BACKEND_REGISTRY / register_backend / select_backend -> the op's implementations (molora_kernels.backends)
    route(logits, top_k, router)           -> Routing            (gates, probs, top-k indices)
    routing_stats(routing, top_k, mask)    -> RouterStats        (per-expert loads for aux loss/telemetry)
    moe_lora(x, a_all, b_all, w_router, ...) -> MoLoRAOutput     (output delta + RouterStats)
    load_balancing_loss(stats_list, ...)   -> scalar tensor      (MoLA aux loss of one decoder layer)
"""
import importlib
from typing import Any

# Lazy attributes (PEP 562): `import molora_kernels.routers` (pure Python, what configs and recipes validate
# against) must not pay for torch; the names below import their submodule on first access.
_LAZY = {
    "LAYOUTS": "layouts", "Layout": "layouts", "get_layout": "layouts", "register_layout": "layouts",
    "BACKEND_REGISTRY": "backends", "Backend": "backends", "register_backend": "backends",
    "select_backend": "backends",
    "ROUTERS": "routers", "Router": "routers", "get_router": "routers", "register_router": "routers",
    "Routing": "routing", "RouterStats": "routing", "route": "routing", "routing_stats": "routing",
    "load_balancing_loss": "routing",
    "BACKENDS": "ops", "MoLoRAOutput": "ops", "moe_lora": "ops", "available_backends": "ops",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'molora_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ROUTERS",
    "LAYOUTS",
    "Layout",
    "get_layout",
    "register_layout",
    "BACKEND_REGISTRY",
    "Backend",
    "register_backend",
    "select_backend",
    "Router",
    "get_router",
    "register_router",
    "Routing",
    "RouterStats",
    "route",
    "routing_stats",
    "load_balancing_loss",
    "BACKENDS",
    "MoLoRAOutput",
    "moe_lora",
    "available_backends",
]
__version__ = "0.1.0"
