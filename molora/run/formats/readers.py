"""File readers: a data file -> ``[(location, row), ...]``, the location naming the file and line / item / row for
error messages. One registry keyed by file suffix; JSON (JSONL or a JSON list, sniffed from the first non-blank
character) reads every suffix no other reader claims.

How to add a reader: a function ``read(path) -> list[(location, row)]`` raising :class:`DataError` for an unreadable
file, and a ``register_reader(Reader(name, suffixes, read))`` line; the contract test in
``tests/run/test_data_formats.py`` writes the same rows in every registered format and reads them back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data_errors import DataError

__all__ = ["Reader", "register_reader", "reader_for", "read_entries", "READERS", "TABLE_SUFFIXES", "read_table_rows"]

Entries = list[tuple[str, Any]]


@dataclass(frozen=True)
class Reader:
    name: str
    suffixes: tuple[str, ...]  # lower case, with the dot; () for the fallback (JSON)
    read: Callable[[Path], Entries]


READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> Reader:
    if reader.name in READERS:
        raise ValueError(f"file reader {reader.name!r} is already registered")
    READERS[reader.name] = reader
    return reader


def reader_for(path: Path) -> Reader:
    """The reader claiming ``path``'s suffix, else the JSON reader."""
    suffix = path.suffix.lower()
    for reader in READERS.values():
        if suffix in reader.suffixes:
            return reader
    return READERS["json"]


def read_entries(path: Path) -> Entries:
    return reader_for(path).read(path)


def read_json(path: Path) -> Entries:
    """(location, row) of a JSONL file (``file:line``; blank lines skipped) or a JSON list (``file, item [i]``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: bad JSON: {exc.msg} (column {exc.colno})") from None
        return [(f"{path}, item [{i}]", row) for i, row in enumerate(data)]
    entries: Entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: bad JSON: {exc.msg} (column {exc.colno})") from None
        entries.append((f"{path}:{lineno}", row))
    return entries


def _read_arrow_table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        try:
            with pa.memory_map(str(path)) as src:
                return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as src:
                return pa.ipc.open_file(src).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {exc}") from exc


def read_table_rows(path) -> list[Any]:
    """Rows of a Parquet file or an Arrow IPC file/stream (``datasets``' ``.arrow`` files) as Python dicts."""
    return _read_arrow_table(Path(path)).to_pylist()


def read_table(path: Path) -> Entries:
    """(``file, row [i]``, row) of a Parquet or Arrow file (read with pyarrow, a dependency of ``datasets``)."""
    return [(f"{path}, row [{i}]", row) for i, row in enumerate(read_table_rows(path))]


register_reader(Reader("json", (), read_json))
register_reader(Reader("parquet", (".parquet",), read_table))
register_reader(Reader("arrow", (".arrow",), read_table))

#: table files read with pyarrow
TABLE_SUFFIXES = tuple(s for r in READERS.values() if r.read is read_table for s in r.suffixes)
