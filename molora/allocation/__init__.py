"""Layer-wise expert allocation: the allocation wing of molora.

* :mod:`.specs` -- how a user writes an allocation (ints, per-layer lists, MoLA block notation, presets, budgets)
  and how it resolves to one value per layer. Pure Python (no torch): the recipe validator loads it directly.
* :mod:`.mapping` -- per-layer scores to integer expert counts (``E_l ∝ score_l^β``, min/max, exact budget).
* :mod:`.signals` -- data-driven per-layer importance signals (block influence, PL alpha-Hill, gradient norm,
  attention/MLP influence), each a registered :class:`~.signals.Signal`.
* :mod:`.auto` -- ``molora allocate`` and ``allocation.num_experts: auto:METHOD`` in recipes: a model and
  calibration rows in, scores and an allocation out (cached by model + data fingerprint).

Only :mod:`.specs` and :mod:`.mapping` are imported here; the signals import torch when first used.
"""
from .specs import *  # noqa: F401,F403 - the public names of the allocation specs
from .specs import __all__ as _specs_all
from .mapping import AUTO_PREFIX, MappingError, is_auto, scores_to_experts  # noqa: F401

__all__ = list(_specs_all) + ["AUTO_PREFIX", "MappingError", "is_auto", "scores_to_experts"]
