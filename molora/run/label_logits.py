"""Compute the LM head only where the loss needs it.

With answer-only training (``train_on_inputs: false``) a classification row has a few labelled tokens
after a prompt of ~100: projecting every position onto the vocabulary (49k for SmolLM2, 32k for
LLaMA-2) and taking its log-softmax is wasted work -- ~20% of a SmolLM2-135M training step on CPU.
Hugging Face causal LMs take ``logits_to_keep`` (positions whose logits are computed) and their loss
takes ``shift_labels`` (the target of each kept position), so the Trainer's own loss can be computed on
the kept positions only. The loss is the same sum over the same labelled tokens, divided by the same
count (``num_items_in_batch`` or the number of labelled tokens): identical up to float rounding, and
the gradients too.

:func:`label_positions` picks the positions; :func:`accepts_logits_to_keep` says whether a model's
forward takes the argument (every decoder in transformers >= 4.50 does).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from .data import IGNORE_INDEX

__all__ = ["label_positions", "accepts_logits_to_keep", "restrict_to_labels"]


def label_positions(
    labels: torch.Tensor, max_fraction: float = 0.5, ignore_index: int = IGNORE_INDEX
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Positions whose logits the causal-LM loss reads, and their targets.

    Args:
        labels: ``[B, L]`` token ids, ``ignore_index`` where there is no loss (unshifted, as the model
            takes them: the logits at position ``p`` predict ``labels[:, p + 1]``).
        max_fraction: return ``None`` (keep every position) when the kept positions would be more
            than this fraction of ``L``: slicing then saves little.
    Returns:
        ``(positions, shift_labels)``: ``positions`` ``[P]`` (int64, ascending) = every ``p`` in
        ``[0, L - 2]`` where some row has a label at ``p + 1``; ``shift_labels`` ``[B, P]`` =
        ``labels[:, positions + 1]``. ``None`` if there is no label at all or slicing is not worth it.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, length], got shape {tuple(labels.shape)}")
    targets = labels[:, 1:]
    positions = (targets != ignore_index).any(dim=0).nonzero().flatten()
    if positions.numel() == 0 or positions.numel() > max_fraction * labels.shape[1]:
        return None
    return positions, targets.index_select(1, positions)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the forward of ``model`` (unwrapped from PEFT / DeepSpeed / DDP wrappers) takes
    ``logits_to_keep``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "module", None)  # DeepSpeed engine, DDP
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
            continue
        break
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def restrict_to_labels(inputs: dict, max_fraction: float = 0.5) -> dict:
    """``inputs`` (a batch with ``labels``) plus ``logits_to_keep`` and ``shift_labels`` when only a
    fraction of the positions carry a label; otherwise ``inputs`` unchanged. ``labels`` is kept, so
    the model still computes its loss (and the Trainer still counts the labelled tokens)."""
    labels = inputs.get("labels")
    if not isinstance(labels, torch.Tensor) or "logits_to_keep" in inputs or "shift_labels" in inputs:
        return inputs
    picked = label_positions(labels, max_fraction)
    if picked is None:
        return inputs
    positions, shift_labels = picked
    return {**inputs, "logits_to_keep": positions, "shift_labels": shift_labels}
