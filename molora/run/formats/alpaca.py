"""The ``alpaca`` row format: instruction data::

    {"instruction": str, "input": str (optional), "output": str}

Prompted with the Alpaca templates (as alpaca-lora and the original MoLA code), the one without an input section
when ``input`` is empty; the target is ``output``.
"""
from __future__ import annotations

from typing import Any, Mapping

from .base import RowFormat, register_format

#: The Alpaca prompt (as used by alpaca-lora and the original MoLA code) for rows with an input.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
#: The Alpaca prompt for rows whose ``input`` is empty.
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_template(row: Mapping[str, Any]) -> str:
    """The Alpaca template for ``row``: with an input section when its ``input`` is non-empty."""
    return ALPACA_TEMPLATE if (row.get("input") or "").strip() else ALPACA_TEMPLATE_NO_INPUT


class AlpacaFormat(RowFormat):
    name = "alpaca"

    def detect(self, row):
        return "instruction" in row or "output" in row

    def normalise(self, row):
        return dict(row, input="") if row.get("input") is None else row

    def check(self, row):
        for key in ("instruction", "output"):
            if key not in row:
                return f"missing field {key!r} (alpaca format needs 'instruction', 'output', optional 'input')"
            if not isinstance(row[key], str):
                return f"field {key!r} must be a string, got {type(row[key]).__name__}"
        if not row["instruction"].strip():
            return "field 'instruction' is empty"
        if row.get("input") is not None and not isinstance(row["input"], str):
            return f"field 'input' must be a string, got {type(row['input']).__name__}"
        return None

    def default_template(self, row):
        return alpaca_template(row)

    def target(self, row, prompt):
        return row["output"]

    def example(self):
        return {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


register_format(AlpacaFormat())
