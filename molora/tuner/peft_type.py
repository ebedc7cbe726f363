"""The PEFT type of the ``molora`` method.

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
