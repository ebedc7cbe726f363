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

Pure Python (read by torch-free code like the routers registry).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Layout", "LAYOUTS", "get_layout"]


@dataclass(frozen=True)
class Layout:
    name: str
    summary: str
    shared_a: bool
    backends: tuple[str, ...]

    def a_rows(self, num_experts: int, rank: int) -> int:
        """Rows of the module's A parameter: E·r stacked, r shared."""
        return rank if self.shared_a else num_experts * rank


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("stacked", "one A_e and B_e per expert (MoLA)", False, ("torch", "reference", "sparse", "triton")),
    Layout("shared_a", "one A shared by all experts, one B head per expert (HydraLoRA)", True, ("torch", "reference")),
)}


def get_layout(name: str) -> Layout:
    layout = LAYOUTS.get(name) if isinstance(name, str) else None
    if layout is None:
        raise ValueError(f"layout={name!r} is not a known expert layout; allowed: {', '.join(LAYOUTS)}")
    return layout
