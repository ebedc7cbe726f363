"""The row-format contract (:class:`RowFormat`) and its registry; the formats themselves are the sibling modules."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..data_errors import DataError

__all__ = ["RowFormat", "register_format", "get_format", "detect_format", "format_names"]


class RowFormat:
    """One row format. Subclasses set :attr:`name` and implement :meth:`detect` and :meth:`check`; formats prompted
    with a template implement :meth:`default_template`, :meth:`template_values` and :meth:`target`; formats that
    tokenise themselves (chat) implement :meth:`tokenize` and set :attr:`uses_prompt_template` False."""

    name: str = ""
    #: rows are turned into (prompt, target) text by a prompt template (False: :meth:`tokenize` does it all)
    uses_prompt_template: bool = True
    #: rows carry answer options that evaluation can score by log-likelihood
    has_options: bool = False

    def detect(self, row: Mapping[str, Any]) -> bool:
        """Whether ``row`` (a mapping) looks like this format (by its keys)."""
        raise NotImplementedError

    def check(self, row: dict[str, Any]) -> Optional[str]:
        """What is wrong with ``row`` (a dict, already :meth:`normalise`-d), or None when it is valid."""
        raise NotImplementedError

    def normalise(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row in its canonical form, before :meth:`check` (e.g. a missing alpaca ``input`` -> "")."""
        return row

    def default_template(self, row: Mapping[str, Any]) -> str:
        """The prompt template used when the recipe names none."""
        raise DataError(f"{self.name} rows have no prompt template")

    def template_values(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The ``str.format`` fields a template may use: every scalar field except ``output``, ``input`` as a
        string (empty when absent)."""
        values = {k: v for k, v in row.items() if isinstance(v, (str, int, float)) and k != "output"}
        values["input"] = row.get("input") or ""
        return values

    def target(self, row: Mapping[str, Any], prompt: str) -> str:
        """The training target text that follows ``prompt``."""
        raise DataError(f"{self.name} rows have no target text")

    def tokenize(self, row: Mapping[str, Any], tokenizer, cutoff_len: Optional[int], train_on_inputs: bool,
                 lengths: Optional[dict[str, int]]) -> dict[str, list[int]]:
        """Training features for formats that do not use a prompt template (see ``data.tokenize_row``)."""
        raise NotImplementedError

    def example(self) -> dict[str, Any]:
        """A valid row (the contract test's input)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<row format {self.name!r}>"


_FORMATS: dict[str, RowFormat] = {}


def register_format(fmt: RowFormat) -> RowFormat:
    """Add a row format (detection tries formats in registration order). A name already taken is an error."""
    if not fmt.name or fmt.name == "auto":
        raise ValueError(f"a row format needs a name other than 'auto', got {fmt.name!r}")
    if fmt.name in _FORMATS:
        raise ValueError(f"row format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    """The registered names plus ``"auto"``."""
    return (*_FORMATS, "auto")


def get_format(name: str) -> RowFormat:
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown data format {name!r}; expected one of {format_names()}") from None


def detect_format(row: Any) -> Optional[RowFormat]:
    """The first registered format whose :meth:`RowFormat.detect` accepts ``row`` (None: none does)."""
    if not isinstance(row, Mapping):
        return None
    for fmt in _FORMATS.values():
        if fmt.detect(row):
            return fmt
    return None
