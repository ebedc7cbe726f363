"""The tuner's inference path: eval mode, no gradient, no statistics asked for -> :func:`molora_kernels.decode.decode`.

Used when the adapter computes with the stacked layout on the ``auto`` or ``torch`` backend and its weights are whole
on the input's device (not ZeRO-3 partitions); everything else takes the training path, which gives the same outputs
(tests in ``tests/tuner/test_decode.py``). The module keeps its resolved routing (:class:`DecodeMember`), rebuilt when a
routing setting changes; the weights are always read as they are now.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from molora_kernels import get_layout
from molora_kernels.decode import DecodeMember, decode
from molora_kernels.ops import autocast_dtype

__all__ = ["decode_module"]


def _operands(module: nn.Module, name: str, x: torch.Tensor) -> Optional[tuple]:
    """(A, B, router weight) of adapter ``name`` when it can take the inference path for input ``x``, else None:
    the stacked layout on the ``auto`` or ``torch`` backend, weights whole (not ZeRO-3 partitions) on x's device.
    The parameters are read from the ParameterDicts' own tables (``ParameterDict.__getitem__`` goes through
    ``Module.__getattr__``: microseconds per call, which a decode step pays 600 times)."""
    if module.backend[name] not in ("auto", "torch") or not get_layout(module.layout.get(name, "stacked")).fast_paths:
        return None
    ops = (module.molora_A._parameters.get(name), module.molora_B._parameters.get(name),
           module.molora_router._parameters.get(name))
    device = x.device
    for p in ops:
        if p is None or p.device != device or getattr(p, "ds_id", None) is not None:
            return None
    return ops


def _member(module: nn.Module, name: str) -> DecodeMember:
    key = (module.num_experts[name], module.top_k[name], module.scaling[name], module.router_type[name],
           repr(module.router_options[name]))
    cache = module.__dict__.setdefault("_decode_plan", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, DecodeMember.of(*key[:4], module.router_options[name] or None))
    return hit[1]


def decode_module(module: nn.Module, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    """One module's delta [..., d_out] on the inference path, in the compute dtype (autocast's when it is on), or
    None when adapter ``name`` cannot take it (see :func:`_operands`; the caller has checked eval mode, no gradient
    and no statistics, and then runs the training path)."""
    ops = _operands(module, name, x)
    if ops is None:
        return None
    member = _member(module, name)
    ids = module._token_ids(name, x).reshape(-1) if member.needs_token_ids else None
    x2 = x.reshape(-1, x.shape[-1])
    dt = autocast_dtype(x)
    if dt is not None:
        with torch.autocast(x.device.type, enabled=False):
            out = decode(x2.to(dt), *ops, member, ids)
    else:
        out = decode(x2, *ops, member, ids)
    return out.reshape(*x.shape[:-1], out.shape[-1])
