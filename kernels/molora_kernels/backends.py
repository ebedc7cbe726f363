"""The backend registry: one :class:`Backend` per implementation of the stacked MoE-LoRA op, and one selection
function (:func:`select_backend`), in the manner of Liger-Kernel's register/select.

Every backend computes docs/design.md §2 for the ``stacked`` layout: ``run(x2, a_all, b_all, router_weight, *,
base, top_k, scaling, dropout, training, router, [router_options, token_ids, routing_mask]) -> (out, routing)``
with ``x2`` [T, d_in], ``a_all`` [E·r, d_in], ``b_all`` [d_out, E·r], ``router_weight`` [E, d_in], ``base``
[T, d_out] or None, and ``out`` [T, d_out] = ``base + delta`` (``delta`` when ``base`` is None). Layouts with a
formula of their own (``shared_a``) run it themselves (:mod:`.layouts`), on any backend they list.

How to add a backend:

1. Add its name to ``ALL_BACKENDS`` in :mod:`.routers` (the one pure list that configs and recipes check names
   against, without importing torch), and to the ``backends`` of the routers and layouts it implements.
2. Write the op (its own module, like :mod:`.sparse`) with the signature above, and register it at the end of this
   file: ``register_backend(Backend("name", run, available=..., why_unavailable=...))``.
3. Teach the cost model (:mod:`.cost_model`) when ``auto`` should pick it, or leave ``auto`` alone.

``tests/kernels/test_kernel_registries.py`` runs every registered backend that is available on the CPU through the same
checks against the plain reference (outputs and gradients, fp32 and autocast).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import cost_model, torch_dense
from .routers import ALL_BACKENDS, Router, get_router
from .routing import route
from .sparse import moe_lora_sparse
from .torch_fused import moe_lora_fused

__all__ = ["Backend", "BACKEND_REGISTRY", "register_backend", "get_backend", "available_backends", "select_backend",
           "reference_op"]


def _always(device: torch.device) -> bool:
    return True


def _no_reason(device: torch.device) -> str:
    return ""


@dataclass(frozen=True)
class Backend:
    name: str
    #: the op: (x2, a_all, b_all, router_weight, *, base, **kw) -> (out [T, d_out], Routing)
    run: Callable
    #: whether it can run on a device (Triton: a CUDA device, or its CPU interpreter)
    available: Callable[[torch.device], bool] = _always
    #: why not, in words, when ``available`` is False
    why_unavailable: Callable[[torch.device], str] = _no_reason


BACKEND_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name not in ALL_BACKENDS:
        raise ValueError(f"backend {backend.name!r} is not in molora_kernels.routers.ALL_BACKENDS "
                         f"({', '.join(ALL_BACKENDS)}); add it there first (configs check names against that list)")
    if backend.name in BACKEND_REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered")
    BACKEND_REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return BACKEND_REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend={name!r}; allowed: auto, {', '.join(BACKEND_REGISTRY)}") from None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on ``device`` (``"auto"`` picks among these)."""
    device = torch.device(device)
    return [b.name for b in BACKEND_REGISTRY.values() if b.available(device)]


def _unavailable(backend: Backend, device: torch.device) -> ValueError:
    why = backend.why_unavailable(device)
    return ValueError(f"backend {backend.name!r} is not available on {device}{f' ({why})' if why else ''}; "
                      f"available: {', '.join(available_backends(device))} (or 'auto')")


def select_backend(backend: str, x2: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                   router_weight: torch.Tensor, top_k: int, router: "str | Router",
                   needs_backward: bool = True) -> str:
    """The concrete backend the op runs for these inputs: ``backend`` itself when it implements ``router`` and can
    run on x's device (else ValueError naming why and what can), or for ``"auto"`` the cost model's choice among
    the router's backends."""
    device = x2.device
    r = router if isinstance(router, Router) else get_router(router)
    router = r.name
    if backend == "auto":
        num_experts = router_weight.shape[0]
        triton = BACKEND_REGISTRY.get("triton")
        choice = cost_model.choose_backend(
            tokens=x2.shape[0], d_in=x2.shape[1], d_out=b_all.shape[0], num_experts=num_experts,
            top_k=r.effective_top_k(top_k, num_experts), rank=a_all.shape[0] // num_experts,
            device=device, dtype=x2.dtype, backward=needs_backward,
            triton=device.type == "cuda" and triton is not None and triton.available(device)
            and "triton" in r.backends)
        if choice not in r.backends:  # the router is not implemented there: the first of its own that runs here
            choice = next(b for b in ("torch", "sparse", "reference") if b in r.backends)
        return choice
    chosen = get_backend(backend)
    if backend not in r.backends:
        raise ValueError(f"backend {backend!r} does not implement router {router!r}; backends for it: "
                         f"{', '.join(r.backends)} (or 'auto')")
    if not chosen.available(device):
        raise _unavailable(chosen, device)
    return backend


# ------------------------------------------------------------------------------------------ the registered ones


def reference_op(x2, a_all, b_all, router_weight, *, top_k, scaling, dropout, training, router, base,
                 router_options=None, token_ids=None, routing_mask=None):
    """The readable reference: the dense-gated formula in plain PyTorch ops, autograd for the backward."""
    h, logits = torch_dense.shrink_and_logits(x2, a_all, router_weight, dropout, training)
    routing = route(logits, top_k, router, router_options, token_ids, routing_mask, training)
    delta = torch_dense.gate_expand(h, routing.gates, b_all, scaling)
    return (delta if base is None else base + delta), routing


_TRITON: dict[str, object] = {}   # the lazily imported triton_moe_lora module (or the reason it is unavailable)


def _triton_module():
    """The triton_moe_lora module, or None (reason kept in ``_TRITON['error']``). Imported on first use."""
    if "module" not in _TRITON:
        try:
            from . import triton_moe_lora as mod
            _TRITON["module"] = mod
        except Exception as exc:  # module missing, triton missing or broken
            _TRITON["module"] = None
            _TRITON["error"] = f"{type(exc).__name__}: {exc}"
    return _TRITON["module"]


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available(device: torch.device) -> bool:
    if torch.device(device).type != "cuda" and not _interpreter_requested():
        return False   # Triton runs on CPU tensors only under its interpreter: don't even import it
    mod = _triton_module()
    if mod is None:
        return False
    try:
        return bool(mod.is_triton_available(device))
    except Exception as exc:
        _TRITON["error"] = f"is_triton_available failed: {type(exc).__name__}: {exc}"
        return False


def _triton_why(device: torch.device) -> str:
    if device.type != "cuda" and not _interpreter_requested():
        return "the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 for the CPU interpreter"
    if _triton_module() is None:
        return str(_TRITON.get("error", "triton_moe_lora could not be imported"))
    return f"is_triton_available({str(device)!r}) is False"


def _triton(x2, a_all, b_all, router_weight, *, base, **kw):
    out, routing = _triton_module().moe_lora_triton(x2, a_all, b_all, router_weight, **kw)
    return (out if base is None else base + out), routing


register_backend(Backend("torch", moe_lora_fused))
register_backend(Backend("reference", reference_op))
register_backend(Backend("sparse", moe_lora_sparse))
register_backend(Backend("triton", _triton, available=_triton_available, why_unavailable=_triton_why))
