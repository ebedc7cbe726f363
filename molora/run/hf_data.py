"""Rows from a Hugging Face dataset (``data.hf_dataset`` in a recipe), mapped onto molora's row formats.

``data.hf_dataset`` names a dataset on the Hub (``tau/commonsense_qa``), or a local folder: one written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder of data files (Parquet, JSON, CSV) that
``datasets.load_dataset`` reads. A Hub dataset is downloaded once when the machine is online and read from the
``datasets`` cache after that (``HF_DATASETS_OFFLINE=1`` makes that explicit); nothing else is fetched.

``data.columns`` maps molora's fields onto the dataset's columns, field by field:

* ``"question"`` -- a column; ``"choices.text"`` reaches into a struct/dict column;
* ``"{sentence1}\\n{sentence2}"`` -- a ``str.format`` template over the row's columns;
* ``[entailment, not_entailment]`` -- a literal value (the label names of a GLUE task).

After mapping, a choices row's ``label`` may be an index (``2``, ``"2"``), a letter (``"C"``: CSQA, OBQA's
``answerKey``) or the text of the gold option; it becomes the index. Columns that cannot be JSON (images, audio)
are dropped; ``data.hf_where`` keeps only the rows whose columns equal the given values (``{image: null}``: the
text-only part of ScienceQA), evaluated on the Arrow table before any row is decoded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from .data import DataError, OPTION_LETTERS, validate_rows

_BINARY_FEATURES = ("Image", "Audio", "Video", "Pdf")


def _get_path(row: Mapping[str, Any], path: str, where: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            have = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise DataError(f"{where}: data.columns refers to {path!r}, but {part!r} is not there (available: {have})")
    return value


def map_row(row: Mapping[str, Any], columns: Optional[Mapping[str, Any]], where: str) -> dict[str, Any]:
    """``row`` with the fields of ``columns`` (see the module doc) set; the original columns are kept."""
    out = dict(row)
    for field, spec in (columns or {}).items():
        if isinstance(spec, str) and "{" in spec:
            try:
                out[field] = spec.format_map({k: v for k, v in row.items()})
            except (KeyError, IndexError, ValueError) as exc:
                raise DataError(f"{where}: data.columns.{field} template {spec!r}: {exc!r} (columns: "
                                f"{sorted(row)})") from None
        elif isinstance(spec, str):
            out[field] = _get_path(row, spec, where)
        else:
            out[field] = spec
    if "choices" in out and "label" in out:
        out["label"] = label_index(out["label"], out["choices"], where)
    return out


def label_index(label: Any, choices: Any, where: str) -> Any:
    """An index into ``choices`` for an index, a numeric string, a letter or the gold option's text (else the value
    unchanged, for validation to report)."""
    if isinstance(label, bool) or not isinstance(choices, list):
        return label
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str):
        text = label.strip()
        if text in choices:
            return choices.index(text)
        if text.isdigit():
            return int(text)
        if len(text) == 1 and text.upper() in OPTION_LETTERS[: len(choices)]:
            return OPTION_LETTERS.index(text.upper())
        raise DataError(f"{where}: label {label!r} is not an index, a letter A-{OPTION_LETTERS[len(choices) - 1]} or "
                        f"one of the choices {choices}")
    return label


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_split(name: str, subset: Optional[str], split: str):
    import datasets

    local = Path(name).expanduser()
    try:
        if local.is_dir() and _is_saved_dataset(local):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"data.hf_dataset {name}: no split {split!r}; splits: {', '.join(ds)}")
                return ds[split]
            if split != "train":
                raise DataError(f"data.hf_dataset {name} is a single Dataset (no splits); it can only be the "
                                f"training split, not {split!r}")
            return ds
        return datasets.load_dataset(str(local) if local.is_dir() else name, subset, split=split)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the message must say what and where
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"data.hf_dataset {name!r} (subset {subset!r}, split {split!r}) could not be loaded: {msg}. Offline, "
            f"a Hub dataset is read from the datasets cache (run once online, or set HF_DATASETS_OFFLINE=1); or point "
            f"data.hf_dataset at a local copy (a save_to_disk folder or a folder of Parquet/JSON files)") from None


def _filter(ds, where: Mapping[str, Any], name: str):
    """Rows whose columns equal ``where``'s values, decided on the Arrow table (no row decoding)."""
    import pyarrow.compute as pc

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    keep = None
    for col, value in where.items():
        if col not in ds.column_names:
            raise DataError(f"data.hf_where: {name} has no column {col!r}; columns: {', '.join(ds.column_names)}")
        column = table.column(col)
        mask = pc.is_null(column) if value is None else pc.equal(column, value)
        mask = pc.fill_null(mask, False)
        keep = mask if keep is None else pc.and_(keep, mask)
    if keep is None:
        return ds
    return ds.select([i for i, k in enumerate(keep.to_pylist()) if k])


def load_hf_rows(name: str, subset: Optional[str], split: str, columns: Optional[Mapping[str, Any]] = None,
                 where: Optional[Mapping[str, Any]] = None, format: str = "auto",
                 max_rows: Optional[int] = None) -> list[dict[str, Any]]:
    """Validated molora rows of one split of a Hugging Face dataset (see the module doc).

    Raises:
        DataError: the dataset/split cannot be loaded (the message says how to work offline), a mapped column is
            missing, a label cannot be read, or a row is invalid for ``format`` (naming its index).
    """
    ds = _load_split(name, subset, split)
    if where:
        ds = _filter(ds, where, name)
    binary = [c for c, f in ds.features.items() if type(f).__name__ in _BINARY_FEATURES]
    if binary:
        ds = ds.remove_columns(binary)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    source = f"{name}" + (f"/{subset}" if subset else "") + f" [{split}]"
    rows = [map_row(r, columns, f"{source}, row [{i}]") for i, r in enumerate(ds)]
    return validate_rows(rows, format=format, source=source)

