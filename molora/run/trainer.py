"""``molora train``'s Trainer without importing transformers: :func:`build_trainer_class` imports
:mod:`molora.run.trainer_class` (the ``Trainer`` subclass) when a run needs it."""
from __future__ import annotations

from .router_lr import split_router_groups  # noqa: F401  (its former home)


def build_trainer_class():
    """The ``Trainer`` subclass of ``molora train`` (:class:`molora.run.trainer_class.MoLoRATrainer`), imported on
    first use so that importing the run wing does not import transformers."""
    from .trainer_class import MoLoRATrainer

    return MoLoRATrainer
