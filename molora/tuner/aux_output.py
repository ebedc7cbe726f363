"""The aux loss as a model output that trainers outside molora can weight: TRL's SFT/DPO trainers.

TRL's trainers do not optimise ``outputs.loss``: they compute the loss from the per-token log-probabilities of a
fused LM head, and add a Mixture-of-Experts load-balancing term ``router_aux_loss_coef * outputs.aux_loss`` only
for models whose config declares ``output_router_logits`` (Mixtral, Qwen-MoE, ...). So that a MoLoRA model is
seen as what it is -- a mixture of experts with an aux loss -- :func:`advertise_aux_loss` declares both
attributes on the base model's config (only where the architecture has none of its own):

* ``router_aux_loss_coef = MoLoRAConfig.aux_loss_coef``: TRL then weights and logs ``aux_loss``;
* ``output_router_logits = False``: TRL sets it to True and passes ``output_router_logits=True`` to the forward;
  :func:`neutralise_router_logits_kwarg` turns that back into False before the base model runs, since a dense
  model has no router logits to return (TRL's fused head would otherwise call Mixtral's loss on ``None``).

The gradient: ``outputs.aux_loss`` is, in training, a leaf that requires grad with a hook
(:func:`aux_output`). When a trainer adds ``c * aux_loss / steps`` to its objective, the hook records
``d objective / d aux_loss`` and :meth:`ForwardRecord.aux_grad_scale` turns it into the factor of the injected
router gradient, exactly as :class:`LossGradProbe` does for a trainer that optimises ``outputs.loss`` (the two add
up when both are used). Routers therefore receive the gradient of the aux term as the trainer weighted it --
gradient accumulation, loss scaling and TRL's own ``router_aux_loss_coef`` included.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn

from .router_state import ForwardRecord

#: marker on a config whose MoE attributes molora declared (so they are not mistaken for the model's own)
_MARK = "_molora_declared_router_aux"


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def advertise_aux_loss(model: nn.Module, coef: float) -> bool:
    """Declare ``router_aux_loss_coef`` / ``output_router_logits`` on ``model``'s config (see the module doc).

    Returns True when the config now carries molora's declaration (also when it did already); False when the
    architecture has MoE attributes of its own (those are left alone: a trainer then weights the model's own aux
    loss, and molora's aux reaches the routers with factor 1) or ``coef`` is 0.
    """
    config = _text_config(model)
    if config is None or coef <= 0:
        return False
    if getattr(config, _MARK, False):
        config.router_aux_loss_coef = coef
        return True
    if hasattr(config, "router_aux_loss_coef") or hasattr(config, "output_router_logits"):
        return False
    config.output_router_logits = False
    config.router_aux_loss_coef = coef
    setattr(config, _MARK, True)
    return True


def neutralise_router_logits_kwarg(model: nn.Module, kwargs: dict) -> bool:
    """Set ``output_router_logits=False`` in a forward's kwargs when a trainer asked for router logits (by kwarg or
    by switching the declared config flag on). Returns True when ``kwargs`` was changed."""
    config = _text_config(model)
    if config is None or not getattr(config, _MARK, False):
        return False
    if kwargs.get("output_router_logits") or getattr(config, "output_router_logits", False):
        kwargs["output_router_logits"] = False
        return True
    return False


def _store_aux_out_grad(record: ForwardRecord, coef: float, grad: torch.Tensor) -> None:
    g = grad.detach().float() / coef
    record.aux_out_grad = g if record.aux_out_grad is None else record.aux_out_grad + g


def aux_output(aux: torch.Tensor, record: ForwardRecord, coef: float) -> torch.Tensor:
    """``aux`` (detached, float32 scalar) as the ``aux_loss`` output. With autograd on: a leaf that requires grad,
    whose gradient (``d objective / d aux_loss``) is recorded as ``record.aux_out_grad = grad / coef``."""
    if not torch.is_grad_enabled() or coef <= 0:
        return aux
    leaf = aux.detach().clone().requires_grad_(True)
    leaf.register_hook(functools.partial(_store_aux_out_grad, record, coef))
    return leaf


def declared_coef(model: nn.Module) -> Optional[float]:
    """The coefficient molora declared on ``model``'s config, or None."""
    config = _text_config(model)
    if config is None or not getattr(config, _MARK, False):
        return None
    return float(config.router_aux_loss_coef)
