"""Registration of the ``molora`` method with PEFT (``peft.utils.register_peft_method``).

PEFT keys methods by members of its ``PeftType`` enum; a method from outside PEFT needs a member there, so we
add ``PeftType.MOLORA`` once (the enum is a ``str`` enum: the member's value is the string "MOLORA").
"""
from __future__ import annotations

from peft.utils import PeftType

NAME = "molora"


def _ensure_peft_type() -> PeftType:
    if "MOLORA" in PeftType.__members__:
        return PeftType.MOLORA
    member = str.__new__(PeftType, "MOLORA")
    member._name_ = "MOLORA"
    member._value_ = "MOLORA"
    member.__objclass__ = PeftType
    PeftType._member_map_["MOLORA"] = member
    PeftType._value2member_map_["MOLORA"] = member
    PeftType._member_names_.append("MOLORA")
    type.__setattr__(PeftType, "MOLORA", member)
    return member


PEFT_TYPE = _ensure_peft_type()


def register() -> None:
    """Register config, tuner and prefix with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    from .config import MoLoRAConfig
    from .model import MoLoRAModel

    register_peft_method(name=NAME, config_cls=MoLoRAConfig, model_cls=MoLoRAModel, prefix="molora_")
