"""Where the layers are: find the numbered blocks (decoder/encoder layers) of any HF model.

No architecture-specific code: a module lives in layer ``i`` when its qualified name has a component ``i``
whose parent is an ``nn.ModuleList`` (``model.layers.3.self_attn.q_proj``, ``bert.encoder.layer.3.attention...``,
``transformer.h.3.attn.c_attn``). The outermost such list is the block container; nested lists (e.g. MoE
experts inside a block) do not count.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class BlockPosition:
    container: str  # qualified name of the ModuleList ("model.layers")
    index: int      # position in it
    rest: str       # name inside the block ("self_attn.q_proj")


def block_position(model: nn.Module, name: str) -> Optional[BlockPosition]:
    """The outermost numbered block holding module ``name``, or None."""
    parts = name.split(".")
    module = model
    for i, part in enumerate(parts):
        if isinstance(module, nn.ModuleList) and part.isdigit():
            return BlockPosition(container=".".join(parts[:i]), index=int(part), rest=".".join(parts[i + 1:]))
        module = getattr(module, part, None)
        if module is None:
            return None
    return None


def block_containers(model: nn.Module) -> dict[str, int]:
    """Block containers holding linear layers, with their lengths: ``{"model.layers": 30}``."""
    found: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LINEAR_TYPES):
            pos = block_position(model, name)
            if pos is not None and pos.container not in found:
                found[pos.container] = len(model.get_submodule(pos.container))
    return found


def default_target_regex(model: nn.Module) -> Optional[str]:
    """A regex (PEFT full match) for every linear projection inside the numbered blocks, or None if none."""
    containers: dict[str, set[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LINEAR_TYPES):
            pos = block_position(model, name)
            if pos is not None and pos.rest:
                containers.setdefault(pos.container, set()).add(pos.rest)
    if not containers:
        return None
    alts = [f"{re.escape(c)}\\.\\d+\\.(?:{'|'.join(re.escape(r) for r in sorted(rests))})"
            for c, rests in sorted(containers.items())]
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers of a model (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})


#: name components of a block's attention sub-block (checked first: BERT's ``attention.output.dense`` is attention)
_ATTN_PARTS = re.compile(r"^(self_?attn|self_attention|attn|attention|mixer|crossattention|encdecattention)$", re.I)
#: name components of a block's MLP (feed-forward) sub-block
_MLP_PARTS = re.compile(r"^(mlp|ffn|feed_forward|feedforward|ff|intermediate|output|block_sparse_moe|moe)$", re.I)
MODULE_KINDS = ("attn", "mlp")


def module_kind(rest: str) -> Optional[str]:
    """``"attn"`` or ``"mlp"`` for a module's name inside its block (``self_attn.q_proj``, ``mlp.down_proj``,
    ``attention.output.dense``, ``intermediate.dense``), or None when the name says neither.

    Used when attention and MLP projections of one layer get different expert counts (``num_experts_mlp``).
    The sub-block is read from the name's components: an attention component anywhere wins (so BERT's
    ``attention.output.dense`` is attention and its ``output.dense`` MLP).
    """
    parts = rest.split(".")[:-1]
    if any(_ATTN_PARTS.match(p) for p in parts):
        return "attn"
    if any(_MLP_PARTS.match(p) for p in parts):
        return "mlp"
    return None
