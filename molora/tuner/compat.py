"""Version seams with transformers and PEFT, in one place.

transformers 5.2x renamed gradient checkpointing to *activation* checkpointing (``activation_checkpointing_enable``,
``is_activation_checkpointing``) and warns on every use of the old names; PEFT 0.21 still reads the old property
``is_gradient_checkpointing`` when it wraps a model. :func:`enable_activation_checkpointing` calls whichever API
the installed transformers has, and :func:`peft_wrap` builds the PEFT model while that property answers through
the new name, so a training run does not print the deprecation warning at all (the cause, not a filter).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional


def enable_activation_checkpointing(model, use_reentrant: bool) -> None:
    """Activation (gradient) checkpointing on a transformers model with the non-deprecated API."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextmanager
def legacy_checkpointing_name(model) -> Iterator[None]:
    """While inside, ``type(model).is_gradient_checkpointing`` answers through ``is_activation_checkpointing``
    (no deprecation warning); restored on exit. No-op where transformers has no new name."""
    cls = type(model)
    if not hasattr(cls, "is_activation_checkpointing") or not hasattr(cls, "is_gradient_checkpointing"):
        yield
        return
    had_own = "is_gradient_checkpointing" in cls.__dict__
    saved: Optional[Any] = cls.__dict__.get("is_gradient_checkpointing")
    cls.is_gradient_checkpointing = property(lambda self: self.is_activation_checkpointing)
    try:
        yield
    finally:
        if had_own:
            cls.is_gradient_checkpointing = saved
        else:
            delattr(cls, "is_gradient_checkpointing")


def peft_wrap(build: Callable[[], Any], base_model) -> Any:
    """Run ``build()`` (``get_peft_model(base, cfg)`` or ``PeftModel.from_pretrained(base, ...)``) without the
    deprecated-property warning PEFT triggers on ``base_model``."""
    with legacy_checkpointing_name(base_model):
        return build()
