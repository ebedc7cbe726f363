"""Row formats and file readers: one module per format, behind one registry each.

A **row format** (:class:`RowFormat`) says how a row of a data file is recognised, checked, normalised, prompted and
tokenised. Registered: ``choices`` (multiple choice / classification, the MoLA task files), ``alpaca``
(instruction data) and ``messages`` (chat conversations); ``data.format: auto`` picks the first registered format
whose :meth:`RowFormat.detect` accepts the first row, in registration order.

A **file reader** (:mod:`.readers`) turns a file into ``(location, row)`` pairs: JSONL / JSON list, Parquet and
Arrow (``hf_dataset`` sources are read by :mod:`molora.run.hf_data` and validated the same way).

How to add a row format: a module here with a :class:`RowFormat` subclass (``name``, ``detect``, ``check`` and
either the prompt methods or ``tokenize``, plus an ``example`` row for the contract test), one
``register_format(...)`` line at its end, and its import in the list at the bottom of this file.
``tests/run/test_data_formats.py`` runs every registered format and reader through the same checks.
"""
from __future__ import annotations

# each format registers itself on import; the import order is the detection order (messages first: a chat row may
# also carry a label; choices before alpaca)
from . import messages as _messages  # noqa: F401,I001
from . import choices as _choices  # noqa: F401
from . import alpaca as _alpaca  # noqa: F401
from .base import RowFormat, detect_format, format_names, get_format, register_format

__all__ = ["RowFormat", "register_format", "get_format", "detect_format", "format_names", "FORMATS"]

#: the names ``data.format`` accepts
FORMATS = format_names()
