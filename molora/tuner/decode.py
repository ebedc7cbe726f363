"""The tuner's inference path: eval mode, no gradient, no statistics asked for -> :mod:`molora_kernels.decode`.

A MoLoRA module (or its q/k/v, gate/up sibling group) keeps ``W_cat = [A...; W_router...]`` in the compute dtype,
rebuilt only when a weight changes (its storage or its in-place version counter), so a decode step is one GEMM for
every shrink and router of the group, the routing at inference, and one addmm per module. Used when the adapter
computes with the stacked layout on the ``auto`` or ``torch`` backend and its weights are whole on the input's
device (not ZeRO-3 partitions); everything else takes the training path, which gives the same outputs (tests in
``tests/test_decode.py``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from molora_kernels import get_layout
from molora_kernels.decode import DecodeMember, concat_weights, decode_group
from molora_kernels.ops import autocast_dtype

__all__ = ["decodable", "decode_module", "decode_members"]


def decodable(module: nn.Module, name: str, x: torch.Tensor) -> bool:
    """Whether ``module``'s adapter ``name`` can take the inference path for input ``x`` (the caller has checked
    eval mode, no gradient and no statistics)."""
    if module.backend[name] not in ("auto", "torch") or get_layout(module.layout.get(name, "stacked")).shared_a:
        return False
    for p in (module.molora_A[name], module.molora_B[name], module.molora_router[name]):
        if hasattr(p, "ds_id") or p.device != x.device:
            return False
    return True


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op computes in: autocast's for x's device when it is on, else x's own."""
    return autocast_dtype(x) or x.dtype


def _plan(owner: Any, name: str, modules: Sequence[nn.Module], dtype: torch.dtype) -> tuple:
    """``owner``'s resolved decode plan of adapter ``name`` over ``modules`` in ``dtype``: (W_cat, members),
    rebuilt when any weight was replaced or changed in place (storage, version counter, shape) or a routing
    setting changed."""
    params = [m.molora_A[name] for m in modules] + [m.molora_router[name] for m in modules]
    bs = [m.molora_B[name] for m in modules]
    settings = tuple((m.num_experts[name], m.top_k[name], m.scaling[name], m.router_type[name],
                      repr(m.router_options[name])) for m in modules)
    key = (dtype, settings, tuple((p.data_ptr(), p._version, tuple(p.shape)) for p in (*params, *bs)))
    cache = owner.__dict__.setdefault("_decode_weights", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    wcat = concat_weights(params[:len(modules)], params[len(modules):], dtype)
    with torch.no_grad():
        members = [DecodeMember.of(b.to(dtype), m.num_experts[name], m.top_k[name], m.scaling[name],
                                   m.router_type[name], m.router_options[name] or None) for m, b in zip(modules, bs)]
    cache[name] = (key, (wcat, members))
    return wcat, members


def decode_members(owner: Any, name: str, modules: Sequence[nn.Module], x: torch.Tensor,
                   token_ids: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Deltas [..., d_out_g] of ``modules`` (all reading ``x`` [..., d_in]) in the compute dtype; ``token_ids``
    [...] for modules whose router routes by them."""
    dt = compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(dt)
    wcat, members = _plan(owner, name, modules, dt)
    ids = None if token_ids is None else token_ids.reshape(-1)
    if autocast_dtype(x) is not None:
        with torch.autocast(x.device.type, enabled=False):
            outs = decode_group(x2, wcat, members, ids)
    else:
        outs = decode_group(x2, wcat, members, ids)
    lead = x.shape[:-1]
    return [o.reshape(*lead, o.shape[-1]) for o in outs]


def decode_module(module: nn.Module, name: str, x: torch.Tensor, token_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """One module's delta on the inference path."""
    return decode_members(module, name, [module], x, token_ids)[0]
