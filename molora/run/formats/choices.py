"""The ``choices`` row format: multiple choice and classification, the schema of the MoLA task files::

    {"input": str, "choices": [str, ...], "label": int, ...any other fields}

``label`` indexes ``choices``. The training target is ``" " + choices[label]`` (without the space when the prompt
already ends in whitespace); evaluation scores every option. Template fields: ``{input}``, ``{choices}`` (the
options as lettered lines ``"A. first\\nB. second"``) and any other scalar field of the row.
"""
from __future__ import annotations

import string
from typing import Sequence

from .base import RowFormat, register_format

#: Default prompt for classification / multiple-choice rows.
DEFAULT_CHOICES_TEMPLATE = "{input}\nAnswer:"
OPTION_LETTERS = string.ascii_uppercase


def format_choices(choices: Sequence[str]) -> str:
    """``["x", "y"]`` -> ``"A. x\\nB. y"`` (the ``{choices}`` template field; numbers past 26 options)."""
    if len(choices) > len(OPTION_LETTERS):
        return "\n".join(f"{i + 1}. {c}" for i, c in enumerate(choices))
    return "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices))


def choice_target(prompt: str, choice: str) -> str:
    """Continuation text for option ``choice`` after ``prompt``: ``" " + choice``, or ``choice`` if the prompt
    already ends in whitespace."""
    return choice if (not prompt or prompt[-1].isspace()) else " " + choice


class ChoicesFormat(RowFormat):
    name = "choices"
    has_options = True

    def detect(self, row):
        return "choices" in row or "label" in row

    def check(self, row):
        for key in ("input", "choices", "label"):
            if key not in row:
                return f"missing field {key!r} (choices format needs 'input', 'choices', 'label')"
        if not isinstance(row["input"], str):
            return f"field 'input' must be a string, got {type(row['input']).__name__}"
        choices = row["choices"]
        if not isinstance(choices, list):
            return f"field 'choices' must be a list of strings, got {type(choices).__name__}"
        if not choices:
            return "empty choices"
        for i, c in enumerate(choices):
            if not isinstance(c, str):
                return f"choices[{i}] must be a string, got {type(c).__name__}"
            if not c.strip():
                return f"choices[{i}] is empty"
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            return f"field 'label' must be an integer index into 'choices', got {label!r}"
        if not 0 <= label < len(choices):
            return f"label {label} out of range for {len(choices)} choices"
        return None

    def default_template(self, row):
        return DEFAULT_CHOICES_TEMPLATE

    def template_values(self, row):
        values = super().template_values(row)
        values["choices"] = format_choices(row["choices"])
        values.pop("label", None)
        return values

    def target(self, row, prompt):
        return choice_target(prompt, row["choices"][row["label"]])

    def example(self):
        return {"input": "The sky is", "choices": ["blue", "green"], "label": 0}


register_format(ChoicesFormat())
