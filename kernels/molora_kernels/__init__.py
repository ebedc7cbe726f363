"""molora_kernels: the tensor ops of molora (torch + optional Triton, no transformers).

Installed as ``molora_kernels`` (the repository folder is ``kernels/``). Never import this as a top-level
``kernels`` module: transformers probes that name for the Hugging Face Hub kernels library.

Public API:
    ROUTERS / get_router / register_router -> the router registry (molora_kernels.routers)
    route(logits, top_k, router)           -> Routing            (gates, probs, top-k indices)
    routing_stats(routing, top_k, mask)    -> RouterStats        (per-expert loads for aux loss/telemetry)
    moe_lora(x, a_all, b_all, w_router, ...) -> MoLoRAOutput     (output delta + RouterStats)
    load_balancing_loss(stats_list, ...)   -> scalar tensor      (MoLA aux loss of one decoder layer)
"""
from .layouts import LAYOUTS, Layout, get_layout
from .routers import ROUTERS, Router, get_router, register_router
from .routing import Routing, RouterStats, route, routing_stats, load_balancing_loss
from .ops import BACKENDS, MoLoRAOutput, moe_lora, available_backends

__all__ = [
    "ROUTERS",
    "LAYOUTS",
    "Layout",
    "get_layout",
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
