"""Detecting non-finite values in training: the loss, the gradients and the adapter weights.

``molora train`` checks, at every optimizer step:

* the loss of every micro-batch (after its backward; one host sync per micro-batch);
* the gradients of the trainable parameters, before the optimizer uses them (one host sync per step; skipped
  when an fp16 ``GradScaler`` manages overflows itself, and under DeepSpeed, whose engine steps inside
  ``backward``);
* the trainable parameters after the step (one host sync per step; under ZeRO-3 each rank checks its
  partition).

With ``train.nonfinite: error`` (default) the first non-finite value stops the run with a
:class:`NonFiniteError` naming the step, what went non-finite and where; nothing after it is saved, so the last
checkpoint is the last good state. With ``train.nonfinite: skip`` a step whose loss or gradients are non-finite
is dropped (its gradients are discarded, so the optimizer leaves every weight and its moments alone) and
training goes on, up to ``train.max_nonfinite_skips`` dropped steps in a row. Skipping is not available under
DeepSpeed (its engine applies the step inside ``backward``); its fp16 loss scaler skips overflow steps itself.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["NonFiniteError", "nonfinite_entries", "all_finite", "check_finite_state", "first_nonfinite_module"]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight (the message names the step and where)."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every entry of every tensor is finite (one host sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.numel() > 0]
    if not flags:
        return True
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all().item())


def nonfinite_entries(named: Iterable[tuple[str, torch.Tensor]], limit: int = 5) -> list[str]:
    """``["name (3 nan, 1 inf of 4096)", ...]`` for the first ``limit`` tensors holding non-finite entries."""
    out = []
    for name, t in named:
        if t is None or t.numel() == 0:
            continue
        t = t.detach()
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(bad.sum()) - n_nan
            out.append(f"{name} ({n_nan} nan, {n_inf} inf of {t.numel()})")
            if len(out) >= limit:
                break
    return out


def check_finite_state(state: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` when a state dict (adapter tensors) holds a non-finite entry."""
    if all_finite(state.values()):
        return
    bad = nonfinite_entries(state.items())
    raise NonFiniteError(f"{where}: non-finite adapter weights: {', '.join(bad)}")


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The locally held data of a parameter (its ZeRO-3 partition when it has one)."""
    ds = getattr(p, "ds_tensor", None)
    return ds if ds is not None else p.data


def describe_step(step: int, micro: Optional[int] = None) -> str:
    return f"step {step}" + (f" (micro-batch {micro})" if micro is not None else "")


def first_nonfinite_module(model: torch.nn.Module, **inputs) -> Optional[str]:
    """Run ``model(**inputs)`` once (no grad) and name the first module, in the order they ran, whose output holds a
    non-finite value (its outer wrappers are not named: the innermost first one is what broke); None when every
    output is finite. For scoring and generation, which must refuse non-finite logits before counting them."""
    first: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(mod, args, out):
        if first:
            return
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        t = getattr(t, "logits", t)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            first.append(names.get(id(mod), type(mod).__name__) or "(the model)")

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return first[0] if first else None
