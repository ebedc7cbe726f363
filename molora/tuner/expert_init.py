"""The expert initialisations registered in :mod:`molora.allocation.expert_inits`: each fills a layer's A in place.

``a``: the A parameter ``[rows, d_in]`` (``rows = E·r`` stacked, ``r`` for ``shared_a``; expert ``e`` reads rows
``[e·r, (e+1)·r)``). B stays 0 under every init, so the model starts as the base model. Row norms: kaiming-uniform
(a=sqrt(5)) draws entries of variance ``1 / (3 d_in)``, so a row has squared norm 1/3 on average; the other inits
give every row exactly that norm, so they change directions only, not the scale the learning rate was tuned for.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
import torch.nn as nn

from ..allocation.expert_inits import get_expert_init

__all__ = ["kaiming", "orthogonal", "svd", "resolve", "ROW_NORM"]

#: the expected row norm of kaiming_uniform(a=sqrt(5)) on [rows, d_in]: sqrt(d_in · 1/(3 d_in))
ROW_NORM = math.sqrt(1.0 / 3.0)


def kaiming(a: torch.Tensor, **_) -> None:
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def orthogonal(a: torch.Tensor, **_) -> None:
    nn.init.orthogonal_(a, gain=ROW_NORM)  # exact for rows <= d_in


def _orthonormal_complement(basis: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` random orthonormal rows orthogonal to the orthonormal rows of ``basis`` ``[k, d]`` (needs k + n <= d)."""
    g = torch.randn(n, basis.shape[1], dtype=basis.dtype, device=basis.device)
    if basis.shape[0]:
        g = g - (g @ basis.T) @ basis
    q, _ = torch.linalg.qr(g.T)  # [d, n], orthonormal columns
    return q.T


def svd(a: torch.Tensor, *, rank: int, base_weight: Callable[[], torch.Tensor], module_name: str = "", **_) -> None:
    """Rows of A = the top right singular vectors of the base weight ``W [d_out, d_in] = U S V^T``, each of norm
    :data:`ROW_NORM`, dealt to the experts round-robin: expert ``e``'s ``j``-th row is singular direction ``j·E + e``,
    so every expert starts with a share of the strong and the weaker directions (PiSSA puts the top ``r`` into one
    adapter; with ``E`` experts that would give expert 0 all the energy). Where ``rows`` exceeds the rank of W the
    remaining rows are random directions orthogonal to those (and to each other while ``rows <= d_in``). The base
    weight is not changed (unlike PiSSA, whose residual base needs every token to use the principal adapter; a
    routed token uses only its top-k experts). Cost: one SVD of W per module, in float32 on W's device."""
    rows, d_in = a.shape
    if rows % rank:
        raise ValueError(f"expert_init='svd': {module_name} has {rows} rows of A, not a multiple of r={rank}")
    w = base_weight()
    if w.device.type == "meta" or w.dim() != 2 or w.shape[1] != d_in or w.numel() == 0:
        raise ValueError(f"expert_init='svd' reads the base weight of {module_name or 'a module'}, but it has shape "
                         f"{tuple(w.shape)} on {w.device} (partitioned under ZeRO-3, or not loaded); use "
                         f"expert_init='orthogonal' there")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError(f"expert_init='svd': the base weight of {module_name or 'a module'} is not finite")
    _, _, vh = torch.linalg.svd(w, full_matrices=False)  # [min(d_out, d_in), d_in], by falling singular value
    n = min(rows, vh.shape[0])
    directions = vh[:n]
    if rows > n:
        fill = min(rows, d_in) - n
        extra = [_orthonormal_complement(directions, fill)] if fill > 0 else []
        if rows > d_in:  # more rows than input dimensions: no longer orthogonal, random unit rows
            r = torch.randn(rows - d_in, d_in, dtype=w.dtype, device=w.device)
            extra.append(r / r.norm(dim=1, keepdim=True))
        directions = torch.cat([directions, *extra])
    experts = rows // rank
    # direction j·E + e goes to row e·r + j
    order = torch.arange(rows, device=w.device).reshape(rank, experts).T.reshape(-1)
    a.copy_((directions[order] * ROW_NORM).to(a.dtype))


def resolve(name: str) -> Callable[..., None]:
    """The function registered as ``name`` (ValueError naming the registered ones)."""
    target = get_expert_init(name).function
    module, attr = target.split(":", 1) if ":" in target else (__name__, target)
    return getattr(importlib.import_module(module), attr)
