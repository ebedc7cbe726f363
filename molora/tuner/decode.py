"""The tuner's inference path: eval mode, no gradient, no statistics asked for -> :func:`molora_kernels.decode.decode`.

Used when the adapter computes with the stacked layout on the ``auto`` or ``torch`` backend and its weights are whole
on the input's device (not ZeRO-3 partitions); everything else takes the training path, which gives the same outputs
(tests in ``tests/test_decode.py``). The module keeps its resolved routing (:class:`DecodeMember`), rebuilt when a
routing setting changes; the weights are always read as they are now.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from molora_kernels import get_layout
from molora_kernels.decode import DecodeMember, decode
from molora_kernels.ops import autocast_dtype

__all__ = ["decodable", "decode_module"]


def decodable(module: nn.Module, name: str, x: torch.Tensor) -> bool:
    """Whether ``module``'s adapter ``name`` can take the inference path for input ``x`` (the caller has checked
    eval mode, no gradient and no statistics)."""
    if module.backend[name] not in ("auto", "torch") or get_layout(module.layout.get(name, "stacked")).shared_a:
        return False
    for p in (module.molora_A[name], module.molora_B[name], module.molora_router[name]):
        if hasattr(p, "ds_id") or p.device != x.device:
            return False
    return True


def _member(module: nn.Module, name: str) -> DecodeMember:
    key = (module.num_experts[name], module.top_k[name], module.scaling[name], module.router_type[name],
           repr(module.router_options[name]))
    cache = module.__dict__.setdefault("_decode_plan", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, DecodeMember.of(*key[:4], module.router_options[name] or None))
    return hit[1]


def decode_module(module: nn.Module, name: str, x: torch.Tensor, token_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """One module's delta [..., d_out] on the inference path, in the compute dtype (autocast's when it is on)."""
    dt = autocast_dtype(x)
    x2 = x.reshape(-1, x.shape[-1])
    ids = None if token_ids is None else token_ids.reshape(-1)
    args = (module.molora_A[name], module.molora_B[name], module.molora_router[name], _member(module, name), ids)
    if dt is not None:
        with torch.autocast(x.device.type, enabled=False):
            out = decode(x2.to(dt), *args)
    else:
        out = decode(x2, *args)
    return out.reshape(*x.shape[:-1], out.shape[-1])
