"""Human-readable views of a MoLoRA model: the allocation table and the routers' last decisions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from molora_kernels import get_router

from .layer import MoLoRALayer


@dataclass
class AllocationRow:
    layer: Optional[int]
    num_experts: int
    top_k: int
    r: int
    modules: int
    params: int
    #: "attn" / "mlp" when the layer's attention and MLP projections have their own expert counts, else None
    kind: Optional[str] = None
    #: the router and its options, e.g. "topp (top_p=0.6, entropy_coef=0)"
    router: str = "topk"
    #: the expert layout ("stacked" or "shared_a")
    layout: str = "stacked"

    @property
    def key(self):
        """The router group of the row: the layer index, or ``"3.mlp"`` for one kind of a split layer."""
        return self.layer if self.kind is None else f"{self.layer}.{self.kind}"


class AllocationTable(list):
    """A list of :class:`AllocationRow` (one per layer, or per layer and kind when attention and MLP projections
    have their own expert counts) that prints as a table."""

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self)

    @property
    def total_experts(self) -> int:
        return sum(r.num_experts for r in self)

    def __str__(self) -> str:
        head = f"{'layer':>5}  {'experts':>7}  {'top_k':>5}  {'rank':>4}  {'modules':>7}  {'trainable params':>16}"
        lines = [head, "-" * len(head)]
        for r in self:
            layer = "-" if r.layer is None else str(r.key)
            lines.append(f"{layer:>5}  {r.num_experts:>7}  {r.top_k:>5}  {r.r:>4}  {r.modules:>7}  {r.params:>16,}")
        lines.append("-" * len(head))
        lines.append(f"{'total':>5}  {self.total_experts:>7}  {'':>5}  {'':>4}  "
                     f"{sum(r.modules for r in self):>7}  {self.total_params:>16,}")
        routers = sorted({r.router for r in self})
        if routers != ["topk"]:  # the MoLA default goes unsaid
            lines.append(f"router: {'; '.join(routers)}")
        layouts = sorted({r.layout for r in self})
        if layouts != ["stacked"]:
            lines.append(f"layout: {'; '.join(layouts)}")
        return "\n".join(lines)


def _layers(model: nn.Module) -> list[MoLoRALayer]:
    return [m for m in model.modules() if isinstance(m, MoLoRALayer)]


def allocation_table(model: nn.Module, adapter_name: Optional[str] = None) -> AllocationTable:
    """Per-layer table (layer, experts, top-k, rank, MoLoRA modules, trainable adapter parameters)."""
    rows: dict[object, AllocationRow] = {}
    layers = _layers(model)
    if not layers:
        raise ValueError("this model has no MoLoRA layers; wrap it with peft.get_peft_model(model, MoLoRAConfig(...))")
    for m in layers:
        name = adapter_name or m.active_adapters[0]
        if name not in m.molora_A:
            continue
        n = m.molora_A[name].numel() + m.molora_B[name].numel()
        if m.num_experts[name] > 1:  # a one-expert router is frozen (MoLoRALayer.declare_frozen_router)
            n += m.molora_router[name].numel()
        if name in m.molora_shared_A:  # the always-on shared expert
            n += m.molora_shared_A[name].numel() + m.molora_shared_B[name].numel()
        group = m.router_group.get(name, m.layer_index)
        row = rows.get(group)
        if row is None:
            kind = group.rsplit(".", 1)[1] if isinstance(group, str) else None
            declared = {o.name: o for o in get_router(m.router_type[name]).options}
            opts = {k: v for k, v in (m.router_options.get(name) or {}).items()  # a loss weight left at 0 goes unsaid
                    if k not in declared or declared[k].routing or v != declared[k].default}
            router = m.router_type[name] + (f" ({', '.join(f'{k}={v:g}' for k, v in opts.items())})" if opts else "")
            row = rows[group] = AllocationRow(m.layer_index, m.num_experts[name], m.top_k[name], m.r[name], 0, 0,
                                              kind, router, m.layout.get(name, "stacked"))
        row.modules += 1
        row.params += n
    return AllocationTable(sorted(rows.values(), key=lambda r: (-1 if r.layer is None else r.layer, r.kind or "")))


def _tuner(model: nn.Module):
    from .model import MoLoRAModel

    if isinstance(model, MoLoRAModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, MoLoRAModel):
        return base
    raise ValueError("expected a PeftModel or MoLoRAModel holding a MoLoRA adapter")


def router_summary(model: nn.Module) -> dict:
    """Per-layer routing of the last forward pass: load per expert, entropy, imbalance (see router_state)."""
    return _tuner(model).router_summary()
