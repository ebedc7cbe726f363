"""Registration of the ``molora`` method with PEFT (``peft.utils.register_peft_method``); the enum member it is
keyed by lives in :mod:`.peft_type`."""
from __future__ import annotations

from .peft_type import NAME, PEFT_TYPE


def register() -> None:
    """Register config, tuner and prefix with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    from .config import MoLoRAConfig
    from .model import MoLoRAModel

    register_peft_method(name=NAME, config_cls=MoLoRAConfig, model_cls=MoLoRAModel, prefix="molora_")
