"""Sibling groups: MoLoRA modules of one block that read the same input share one shrink GEMM.

The math is :mod:`molora_kernels.siblings`. This module decides who is a sibling and when the shared path runs:

* groups are formed at injection (``MoLoRAConfig.share_sibling_shrink``, default on) from modules with the same
  parent and a name in one of :data:`SIBLING_SETS` (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``,
  and the other families' names); two or more members make a group;
* at run time the first member called computes every member's output for that input and caches the others';
  a member takes its cached output only when it is called with the very same tensor object (and version), so a
  model whose siblings read different tensors, or in another order, silently gets the per-module path;
* the shared path runs only where it computes the same thing as the per-module op: every member has the adapter,
  not merged, not disabled, stacked layout, the ``torch`` backend (``auto`` resolving to it), the same dropout,
  and parameters that are not ZeRO-3 partitions (another module's weights are only gathered in its own forward).
  Anything else falls back to the per-module op, which is always correct.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch
import torch.nn as nn

from molora_kernels import get_layout
from molora_kernels.ops import MoLoRAOutput, autocast_dtype, resolve_backend
from molora_kernels.routing import routing_stats
from molora_kernels.siblings import SiblingOperands, moe_lora_siblings

#: names of projections that read the same input within one parent module (per model family)
SIBLING_SETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),          # LLaMA, Mistral, Qwen2, Gemma, OPT, ...
    ("gate_proj", "up_proj"),                # LLaMA-style gated MLP
    ("query", "key", "value"),               # BERT, RoBERTa
    ("w1", "w3"),                            # Mixtral-style experts, some LLaMA ports
    ("fc_in", "fc_gate"),
)


def sibling_set(name: str) -> Optional[int]:
    """Index into :data:`SIBLING_SETS` of a module's last name component, or None."""
    for i, names in enumerate(SIBLING_SETS):
        if name in names:
            return i
    return None


class SiblingGroup:
    """Members (in call order of :data:`SIBLING_SETS`) and the cache of one shared computation."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._x: Optional[weakref.ref] = None
        self._key: Optional[tuple] = None
        self._cache: dict[int, MoLoRAOutput] = {}

    def names(self) -> list[str]:
        return [m.module_name for m in self.members]

    # ------------------------------------------------------------------ eligibility
    def _eligible(self, name: str, x2: torch.Tensor) -> bool:
        first = self.members[0]
        dropout = first.lora_dropout.get(name)
        for m in self.members:
            if (name not in m.molora_A or name not in m.active_adapters or m.merged or m.disable_adapters
                    or m.lora_dropout[name] != dropout or not get_layout(m.layout.get(name, "stacked")).fast_paths):
                return False
            params = (m.molora_A[name], m.molora_B[name], m.molora_router[name])
            if any(hasattr(p, "ds_id") or p.device != x2.device for p in params):  # ZeRO-3 partitions
                return False
            needs_backward = torch.is_grad_enabled() and any(p.requires_grad for p in params)
            try:
                if resolve_backend(m.backend[name], x2, *params, m.top_k[name], m.routers[name],
                                   needs_backward) != "torch":
                    return False
            except ValueError:
                return False
        return True

    # ------------------------------------------------------------------ the shared call
    def output_for(self, member: nn.Module, name: str, x: torch.Tensor, token_mask, compute_stats: bool,
                   token_ids: Optional[torch.Tensor], routing_mask: Optional[torch.Tensor] = None
                   ) -> Optional[MoLoRAOutput]:
        """``member``'s MoLoRAOutput for input ``x`` from the shared computation, or None (use the per-module op).
        None while torch.compile traces: the cache is keyed on the input's identity (a weak reference), which a
        traced graph cannot hold; the compiler then sees each module's op alone."""
        if torch.compiler.is_compiling():
            return None
        key = (x._version, name, torch.is_grad_enabled(), member.training, compute_stats,
               autocast_dtype(x), None if token_mask is None else (token_mask.data_ptr(), tuple(token_mask.shape)),
               None if routing_mask is None else (routing_mask.data_ptr(), tuple(routing_mask.shape)))
        i = self.members.index(member)
        if self._x is not None and self._x() is x and self._key == key and i in self._cache:
            return self._cache.pop(i)
        self._cache.clear()
        self._x = None
        x2 = x.reshape(-1, x.shape[-1])
        compute_dtype = autocast_dtype(x2)
        if compute_dtype is not None:
            x2 = x2.to(compute_dtype)
        if not self._eligible(name, x2):
            return None
        ops = [SiblingOperands(a_all=m.molora_A[name], b_all=m.molora_B[name], router_weight=m.molora_router[name],
                               top_k=m.top_k[name], scaling=m.scaling[name], router=m.router_type[name],
                               router_options=m.router_options[name] or None,
                               token_ids=None if token_ids is None else token_ids.reshape(-1),
                               routing_mask=(routing_mask.reshape(-1) if routing_mask is not None
                                             and m.routers[name].batch_dependent else None))
               for m in self.members]
        with (torch.autocast(x2.device.type, enabled=False) if compute_dtype is not None else contextlib.nullcontext()):
            results = moe_lora_siblings(x2, ops, dropout=self.members[0].lora_dropout[name], training=member.training)
        lead = x.shape[:-1]
        mask = None if token_mask is None else token_mask.reshape(-1)
        for j, (out, routing) in enumerate(results):
            stats = routing_stats(routing, mask) if compute_stats else None
            self._cache[j] = MoLoRAOutput(delta=out.reshape(*lead, out.shape[-1]), stats=stats, routing=routing)
        self._x, self._key = weakref.ref(x), key
        return self._cache.pop(i)


def build_groups(model: nn.Module, layer_cls: type) -> list[SiblingGroup]:
    """Attach a :class:`SiblingGroup` to every MoLoRA module of ``model`` that has siblings (see the module doc);
    returns the groups. Modules without siblings get ``sibling_group = None``."""
    by_parent: dict[tuple[str, int], list[tuple[int, nn.Module]]] = {}
    for full, module in model.named_modules():
        if not isinstance(module, layer_cls):
            continue
        module.sibling_group = None
        parent, _, leaf = full.rpartition(".")
        s = sibling_set(leaf)
        if s is not None:
            by_parent.setdefault((parent, s), []).append((SIBLING_SETS[s].index(leaf), module))
    groups = []
    for members in by_parent.values():
        if len(members) < 2:
            continue
        group = SiblingGroup([m for _, m in sorted(members, key=lambda t: t[0])])
        for _, m in members:
            m.sibling_group = group
        groups.append(group)
    return groups
