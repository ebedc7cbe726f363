"""The expert-layout registry: the shapes of a MoLoRA module's A and B, and which backends compute each.

* ``stacked`` (the default, MoLA): every expert has its own A_e [r, d_in] and B_e [d_out, r], stacked as
  A_all [E·r, d_in] and B_all [d_out, E·r].
* ``shared_a`` (HydraLoRA, Tian et al. 2024): one A [r, d_in] shared by all experts, E expert heads B_e
  [d_out, r]; the router still reads x. The dense-gated formula covers it -- a shared A is a gate applied after
  one shrink::

      h     = dropout(x) @ A.T                                  # [T, r]   one shrink instead of E
      delta = s * (repeat(h, E) * expand(gates)) @ B_all.T      # [T, d_out]

Rank-1 experts with k-of-E selection (SMoRA, "each rank an expert") need no layout of their own: they are the
stacked layout with ``r=1`` (e.g. ``num_experts=64, top_k=8, r=1``).

How to add a layout: a :class:`Layout` with its shapes (``a_rows``, ``shape_problem``), how an expert reads A
(``expert_a``) and merges (``merge_a``), the backends that compute it and, when its formula is not the stacked
one, ``op`` (a function in molora_kernels with a backend's signature); one ``register_layout`` line.
``tests/kernels/test_kernel_registries.py`` runs every layout on every backend it lists against a per-token reference
built from ``expert_a``.

Pure Python (read by torch-free code like the routers registry).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

__all__ = ["Layout", "LAYOUTS", "get_layout", "register_layout"]

_RESOLVED: dict[str, Callable] = {}


@dataclass(frozen=True)
class Layout:
    """An expert layout: the shapes of A and B, how experts read their A, how experts merge, which backends compute
    it, and (for a formula other than the stacked one) its own op.

    Pure Python: the tensor methods use only tensor methods, and ``op`` is imported by :meth:`resolve_op`.
    """

    name: str
    summary: str
    shared_a: bool                      # one A for every expert (its rows do not split per expert)
    backends: tuple[str, ...]
    #: "module:function" in molora_kernels of the layout's own op (same signature as a backend's ``run``, see
    #: :mod:`molora_kernels.backends`), which runs whatever backend the config names; None: the backend's
    #: stacked op
    op: Optional[str] = None
    #: the fused paths written for the stacked A_all (one shrink GEMM for q/k/v and gate/up, the decode path)
    #: apply to this layout
    fast_paths: bool = True

    def a_rows(self, num_experts: int, rank: int) -> int:
        """Rows of the module's A parameter: E·r stacked, r shared."""
        return rank if self.shared_a else num_experts * rank

    def shape_problem(self, a, b, num_experts: int, d_in: int) -> Optional[str]:
        """What is wrong with the shapes of A [a_rows, d_in] and B [d_out, E·r] (None: they fit)."""
        r = a.shape[0] if self.shared_a else (a.shape[0] // num_experts if a.shape[0] % num_experts == 0 else None)
        if r is None or a.shape[1] != d_in:
            return (f"layout {self.name!r}: a {tuple(a.shape)} must be [{'r' if self.shared_a else 'E·r'}, "
                    f"d_in={d_in}] with E={num_experts}")
        if b.shape[1] != num_experts * r:
            return f"layout {self.name!r}: b {tuple(b.shape)} must be [d_out, E·r={num_experts * r}]"
        return None

    def expert_a(self, a, expert: int, rank: int):
        """The A [r, d_in] that expert ``expert`` reads (a view)."""
        return a if self.shared_a else a[expert * rank:(expert + 1) * rank]

    def merge_a(self, a, groups: Sequence[Sequence[int]], weights: Sequence[Sequence[float]], rank: int):
        """A of the merged experts: per group, the weighted mean of its experts' A (stacked), or the shared A
        unchanged. ``groups``: expert indices per new expert; ``weights``: their weights (summing to 1)."""
        if self.shared_a:
            return a.detach().clone()
        rows = [sum(w * a[e * rank:(e + 1) * rank].double() for w, e in zip(ws, g, strict=True)).to(a.dtype)
                for g, ws in zip(groups, weights, strict=True)]
        return _cat(rows)

    def resolve_op(self) -> Optional[Callable]:
        """The layout's own op, imported now (call it outside a ``torch.compile`` trace: dynamo does not trace
        importlib); None for layouts that run the backend's stacked op."""
        if self.op is None:
            return None
        fn = _RESOLVED.get(self.op)
        if fn is None:
            module, name = self.op.split(":")
            fn = _RESOLVED[self.op] = getattr(importlib.import_module(f"molora_kernels.{module}"), name)
        return fn


def _cat(rows: list[Any]):
    import torch

    return torch.cat(rows, 0)


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Add a layout (a name already taken is an error). Its backends must be known names."""
    from .routers import ALL_BACKENDS

    unknown = [b for b in layout.backends if b not in ALL_BACKENDS]
    if unknown:
        raise ValueError(f"layout {layout.name!r}: unknown backends {unknown}; known: {', '.join(ALL_BACKENDS)}")
    if layout.name in LAYOUTS:
        raise ValueError(f"layout {layout.name!r} is already registered")
    LAYOUTS[layout.name] = layout
    return layout


register_layout(Layout("stacked", "one A_e and B_e per expert (MoLA)", False, ("torch", "reference", "sparse", "triton")))
register_layout(Layout("shared_a", "one A shared by all experts, one B head per expert (HydraLoRA)", True,
                       ("torch", "reference"), op="torch_dense:moe_lora_shared_a", fast_paths=False))


def get_layout(name: str) -> Layout:
    layout = LAYOUTS.get(name) if isinstance(name, str) else None
    if layout is None:
        raise ValueError(f"layout={name!r} is not a known expert layout; allowed: {', '.join(LAYOUTS)}")
    return layout
