"""Training data: loading, validation, prompting and tokenisation.

Row formats and file readers live in :mod:`molora.run.formats`, one module per format, behind one registry
each: ``choices`` (multiple choice / classification, the MoLA task files: ``{"input", "choices", "label"}``),
``alpaca`` (``{"instruction", "input", "output"}``) and ``messages`` (chat conversations, rendered with the
tokenizer's chat template, loss on the assistant turns only); JSONL / JSON list, Parquet and Arrow files. The row
format is detected per file from its first row (``format="auto"``) or given explicitly. Every row is validated,
and a broken row raises :class:`DataError` naming the file, the 1-based line (JSONL) or the item index (JSON
list) and what is wrong.

Prompts come from a template string with ``str.format`` fields: ``{input}``, ``{choices}`` (the
options as lettered lines ``"A. first\\nB. second"``), ``{instruction}``, and any other string
field of the row (``{question}``, ``{context}``...). Literal braces are written ``{{`` / ``}}``.
Defaults: :data:`DEFAULT_CHOICES_TEMPLATE` for choices rows, the Alpaca templates for alpaca rows.

Tokenisation (:func:`encode_prompt_target`) encodes the prompt and prompt+target and splits at
the prompt's tokens, so the target tokens are those the model sees after the prompt; training
features (:func:`tokenize_row`) are ``input_ids`` / ``attention_mask`` / ``labels`` with an eos
appended to the target, truncation to ``cutoff_len`` and prompt tokens masked with -100 unless
``train_on_inputs``. :class:`DataCollator` right-pads a batch. :mod:`molora.run.evaluation` uses the
same templates and encoding, so training and scoring see identical token sequences.

Over 400 lines because the prompt templates, tokenisation and truncation accounting must agree to the token:
evaluation reuses exactly these functions, so they are kept together here.
"""
from __future__ import annotations

import os
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from .data_errors import IGNORE_INDEX, DataError
from .formats import FORMATS, RowFormat, get_format
from .formats import detect_format as _detect
from .formats.alpaca import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, alpaca_template
from .formats.choices import OPTION_LETTERS  # noqa: F401  (evaluation and hf_data read it from here)
from .formats.choices import DEFAULT_CHOICES_TEMPLATE, choice_target, format_choices
from .formats.readers import TABLE_SUFFIXES, read_table_rows  # noqa: F401  (public names kept)
from .formats.readers import read_entries

__all__ = [
    "DataError",
    "FORMATS",
    "DEFAULT_CHOICES_TEMPLATE",
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "TEMPLATE_PRESETS",
    "DEFAULT_CUTOFF_LEN",
    "IGNORE_INDEX",
    "load_rows",
    "validate_rows",
    "detect_format",
    "split_validation",
    "PromptTemplate",
    "format_choices",
    "choice_target",
    "encode_prompt_target",
    "tokenize_row",
    "SupervisedDataset",
    "build_dataset",
    "make_supervised_dataset",
    "DataCollator",
]

#: Named templates accepted wherever a template string is: ``"default"`` picks the format's default.
TEMPLATE_PRESETS = {
    "default": None,
    "answer": DEFAULT_CHOICES_TEMPLATE,
    "choices": "{input}\n{choices}\nAnswer:",
    "alpaca": "alpaca",  # the two Alpaca variants, chosen per row by whether `input` is empty
}
DEFAULT_CUTOFF_LEN = 256


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def detect_format(row: Mapping[str, Any]) -> str | None:
    """The name of the first registered row format that recognises ``row`` (:mod:`molora.run.formats`: messages
    if it has ``messages``, choices if ``choices`` or ``label``, alpaca if ``instruction`` or ``output``), else
    ``None``."""
    fmt = _detect(row)
    return fmt.name if fmt else None


def _resolve_format(format: str, first_row: Any, where: str) -> RowFormat:
    if format != "auto":
        return get_format(format)  # DataError naming the known formats
    fmt = _detect(first_row)
    if fmt is None:
        keys = sorted(first_row) if isinstance(first_row, dict) else type(first_row).__name__
        raise DataError(
            f"{where}: cannot detect the data format from the first row (fields: {keys}); expected "
            f"'input'/'choices'/'label' (choices format), 'instruction'/'output' (alpaca format) or "
            f"'messages' (messages format)"
        )
    return fmt


def _validated(entries: Sequence[tuple[str, Any]], format: str) -> list[dict[str, Any]]:
    """Every row normalised and checked by its format; DataError ``<location> (id=...): <problem>`` for the first
    broken one."""
    fmt = _resolve_format(format, entries[0][1], entries[0][0])
    rows = []
    for where, row in entries:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        row = fmt.normalise(row)
        problem = fmt.check(row)
        if problem:
            raise DataError(f"{where}{_id_hint(row)}: {problem}")
        rows.append(row)
    return rows


def validate_rows(
    rows: Iterable[Mapping[str, Any]], format: str = "auto", source: str = "<rows>"
) -> list[dict[str, Any]]:
    """Validate in-memory rows and return them as a list (normalised by their format: alpaca rows get ``input`` =
    ``""`` if missing, ShareGPT turns become OpenAI turns).

    Raises:
        DataError: naming ``source`` and the 0-based row index of the first broken row, or an
            empty input.
    """
    entries = [(f"{source}, row [{i}]", r) for i, r in enumerate(rows)]
    if not entries:
        raise DataError(f"{source}: no rows (empty dataset)")
    return _validated(entries, format)


def _id_hint(row: Any) -> str:
    return f" (id={row['id']!r})" if isinstance(row, dict) and "id" in row else ""


def load_rows(
    path: str | os.PathLike,
    format: str = "auto",
    max_examples: int | None = None,
) -> list[dict[str, Any]]:
    """Read and validate a data file.

    Args:
        path: a ``.jsonl`` file (one object per line), a JSON file holding a list of objects, a
            ``.parquet`` file or an ``.arrow`` file (:mod:`molora.run.formats.readers`).
        format: a registered row format (``"choices"``, ``"alpaca"``, ``"messages"``) or ``"auto"`` (detected
            from the first row).
        max_examples: keep only the first ``max_examples`` rows (all rows are still validated).

    Returns:
        The rows as dicts, in file order.

    Raises:
        DataError: unreadable file, bad JSON, a broken row (message: ``<file>:<line>: <problem>``
            for JSONL, ``<file>, item [<index>]: <problem>`` for a JSON list), or no rows at all.
    """
    path = Path(path)
    entries = read_entries(path)
    if not entries:
        raise DataError(f"{path}: no rows (empty dataset)")
    rows = _validated(entries, format)
    if max_examples is not None:
        if max_examples < 1:
            raise DataError(f"max_examples must be >= 1, got {max_examples}")
        rows = rows[:max_examples]
    return rows


def split_validation(
    rows: Sequence[Mapping[str, Any]], n: int, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Carve a validation split out of ``rows`` (for data sets that have none, e.g. obqa).

    A seeded random choice of ``n`` rows becomes validation; the rest stays train, both in their
    original order. Deterministic for a given ``(len(rows), n, seed)``.

    Returns:
        ``(train, validation)``.
    """
    if not 0 < n < len(rows):
        raise DataError(f"split_validation: n must be in [1, {len(rows) - 1}] for {len(rows)} rows, got {n}")
    picked = set(random.Random(seed).sample(range(len(rows)), n))
    train = [dict(r) for i, r in enumerate(rows) if i not in picked]
    validation = [dict(r) for i, r in enumerate(rows) if i in picked]
    return train, validation


# --------------------------------------------------------------------------------------------------
# Prompting
# --------------------------------------------------------------------------------------------------


class PromptTemplate:
    """Turns rows into (prompt, target) strings.

    Args:
        template: ``None`` / ``"default"`` (per-row default: :data:`DEFAULT_CHOICES_TEMPLATE` for
            choices rows, the Alpaca templates for alpaca rows), a preset name from
            :data:`TEMPLATE_PRESETS`, or a ``str.format`` template string.

    Attributes:
        uses_choices: whether the template shows the lettered options (``{choices}``); evaluation
            then also accepts an answer letter.
    """

    def __init__(self, template: str | "PromptTemplate" | None = None):
        if isinstance(template, PromptTemplate):
            template = template.template
        if template in TEMPLATE_PRESETS:
            template = TEMPLATE_PRESETS[template]
        if template is not None and not isinstance(template, str):
            raise TypeError(f"template must be a string or None, got {type(template).__name__}")
        self.template: str | None = template
        self.fields: set[str] = set()
        for text in self._texts():
            try:
                parsed = list(string.Formatter().parse(text))
            except ValueError as exc:
                raise DataError(f"bad prompt template {text!r}: {exc}") from None
            for _, field, _, _ in parsed:
                if field is not None:
                    if field == "" or not field.isidentifier():
                        raise DataError(
                            f"bad prompt template {text!r}: field {{{field}}} must be a plain name "
                            f"like {{input}} (write literal braces as {{{{ and }}}})"
                        )
                    self.fields.add(field)
        self.uses_choices = "choices" in self.fields

    def _texts(self) -> list[str]:
        if self.template is None:
            return [DEFAULT_CHOICES_TEMPLATE, ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT]
        if self.template == "alpaca":
            return [ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT]
        return [self.template]

    def __repr__(self) -> str:
        return f"PromptTemplate({self.template!r})"

    def _format(self, row: Mapping[str, Any]) -> RowFormat:
        fmt = _detect(row)
        if fmt is None:
            raise DataError(f"row{_id_hint(row)} is in no known row format: fields {sorted(row)}")
        if not fmt.uses_prompt_template:
            raise DataError(f"row{_id_hint(row)} is a {fmt.name} row: its prompt comes from the tokenizer's chat "
                            f"template (molora.run.formats.messages), not from a prompt template")
        return fmt

    def prompt(self, row: Mapping[str, Any]) -> str:
        """The prompt text for ``row`` (no target)."""
        fmt = self._format(row)
        text = self.template
        if text is None:
            text = fmt.default_template(row)
        elif text == "alpaca":
            text = alpaca_template(row)
        values = fmt.template_values(row)
        try:
            return text.format_map(values)
        except KeyError as exc:
            raise DataError(
                f"prompt template field {{{exc.args[0]}}} not in row{_id_hint(row)}; available: "
                f"{sorted(values)}"
            ) from None

    def target(self, row: Mapping[str, Any], prompt: str | None = None) -> str:
        """The training target: the gold option (choices rows) or ``output`` (alpaca rows)."""
        fmt = self._format(row)
        return fmt.target(row, self.prompt(row) if prompt is None else prompt)

    def render(self, row: Mapping[str, Any]) -> tuple[str, str]:
        """``(prompt, target)`` for ``row``."""
        prompt = self.prompt(row)
        return prompt, self.target(row, prompt)


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


def _special_prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before the text (e.g. ``[bos]``); cached per tokenizer."""
    cached = getattr(tokenizer, "_molora_special_prefix", None)
    if cached is not None:
        return list(cached)
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix: list[int] = []
    for n in range(len(with_sp) - len(plain) + 1):
        if with_sp[n : n + len(plain)] == plain:
            prefix = list(with_sp[:n])
            break
    try:
        tokenizer._molora_special_prefix = tuple(prefix)
    except AttributeError:
        pass
    return prefix


def _truncate(
    prompt_ids: list[int],
    target_ids: list[int],
    cutoff_len: int,
    n_keep_front: int,
    prompt_truncation: str,
) -> tuple[list[int], list[int]]:
    """Fit ``prompt_ids + target_ids`` into ``cutoff_len`` tokens.

    The target keeps its start and gets at least half the budget (all of it if it fits); the prompt
    gets the rest. ``prompt_truncation="left"`` drops the prompt's start (keeping the first
    ``n_keep_front`` special tokens, e.g. bos) so the text next to the answer survives; ``"right"``
    drops its end.
    """
    if len(prompt_ids) + len(target_ids) <= cutoff_len:
        return prompt_ids, target_ids
    p_keep = min(len(prompt_ids), max(cutoff_len - len(target_ids), cutoff_len // 2))
    t_keep = min(len(target_ids), cutoff_len - p_keep)
    if p_keep < len(prompt_ids):
        if prompt_truncation == "left":
            front = prompt_ids[: min(n_keep_front, p_keep)]
            prompt_ids = front + prompt_ids[len(prompt_ids) - (p_keep - len(front)) :]
        elif prompt_truncation == "right":
            prompt_ids = prompt_ids[:p_keep]
        else:
            raise ValueError(f"prompt_truncation must be 'left' or 'right', got {prompt_truncation!r}")
    return prompt_ids, target_ids[:t_keep]


def encode_prompt_target(
    tokenizer,
    prompt: str,
    target: str,
    cutoff_len: int | None = DEFAULT_CUTOFF_LEN,
    add_eos: bool = True,
    prompt_truncation: Literal["left", "right"] = "left",
    lengths: dict[str, int] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` as it continues the prompt.

    The prompt is ``special_prefix + encode(prompt)``. The target ids are the tail of
    ``encode(prompt + target)`` after the prompt ids (so they are the tokens a model reads
    after the prompt); if the tokenizer merges across the boundary, ``encode(target)`` is used
    instead, so the prompt ids never depend on the target. ``eos`` is appended to the target if
    ``add_eos``. With ``cutoff_len`` the pair is truncated to at most that many tokens (see
    :func:`_truncate`; the target keeps its start, the prompt loses its start by default).

    Returns:
        ``(prompt_ids, target_ids)``: two lists of ints, ``len(prompt_ids) + len(target_ids) <=
        cutoff_len``. ``lengths`` (if given) receives the lengths before truncation (``prompt``, ``target``)
        and the target's length after it (``target_kept``).
    """
    prefix = _special_prefix(tokenizer)
    p_plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
    if full[: len(p_plain)] == p_plain:
        t_ids = full[len(p_plain) :]
    else:
        t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    p_ids = prefix + p_plain
    t_ids = list(t_ids)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise DataError("add_eos=True but the tokenizer has no eos token")
        t_ids.append(tokenizer.eos_token_id)
    if lengths is not None:
        lengths.update(prompt=len(p_ids), target=len(t_ids))
    if cutoff_len is not None:
        if cutoff_len < 2:
            raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len}")
        p_ids, t_ids = _truncate(p_ids, t_ids, cutoff_len, len(prefix), prompt_truncation)
    if lengths is not None:
        lengths.update(target_kept=len(t_ids))
    return p_ids, t_ids


def tokenize_row(
    row: Mapping[str, Any],
    tokenizer,
    template: PromptTemplate | str | None = None,
    cutoff_len: int | None = DEFAULT_CUTOFF_LEN,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    prompt_truncation: Literal["left", "right"] = "left",
    lengths: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """Training features of one row (``lengths``: see :func:`encode_prompt_target`). Messages rows are rendered
    with the tokenizer's chat template instead of ``template`` (:mod:`molora.run.formats.messages`).

    Returns:
        ``{"input_ids": [L], "attention_mask": [L], "labels": [L]}`` (lists of ints, ``L <=
        cutoff_len``): ``input_ids = prompt_ids + target_ids`` (target ends in eos), attention all
        ones, labels equal to ``input_ids`` except the prompt positions are -100 unless
        ``train_on_inputs``.
    """
    fmt = _detect(row)
    if fmt is not None and not fmt.uses_prompt_template:  # chat rows: the tokenizer's template (formats.messages)
        return fmt.tokenize(row, tokenizer, cutoff_len, train_on_inputs, lengths)
    template = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
    prompt, target = template.render(row)
    p_ids, t_ids = encode_prompt_target(tokenizer, prompt, target, cutoff_len, add_eos, prompt_truncation, lengths)
    input_ids = p_ids + t_ids
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(p_ids) + t_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class SupervisedDataset(Dataset):
    """A list-backed ``torch.utils.data.Dataset`` of training features.

    ``dataset[i]`` is ``{"input_ids": [L_i], "attention_mask": [L_i], "labels": [L_i]}`` (lists of
    ints); ``dataset.rows[i]`` is the row it came from.
    """

    def __init__(self, features: list[dict[str, list[int]]], rows: list[dict[str, Any]] | None = None,
                 truncation: "TruncationReport | None" = None):
        self.features = features
        self.rows = rows if rows is not None else []
        self.truncation = truncation or TruncationReport(rows=len(features))

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]

    def num_target_tokens(self) -> int:
        """Total number of positions with a label (not -100)."""
        return sum(sum(1 for x in f["labels"] if x != IGNORE_INDEX) for f in self.features)


@dataclass
class TruncationReport:
    """What ``cutoff_len`` cut from a dataset's rows (token counts before truncation).

    ``cut``: rows longer than ``cutoff_len``; ``answer_cut``: of those, rows that also lost part of their answer
    (target) tokens; ``answer_lost``: rows left with no label token at all (they train on nothing);
    ``longest``: the longest row in tokens; ``examples``: row ids/line positions of the first cut rows.
    """

    rows: int = 0
    cutoff_len: int | None = None
    cut: int = 0
    answer_cut: int = 0
    answer_lost: int = 0
    longest: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, prompt_len: int, target_len: int, kept_target: int, labelled: int) -> None:
        self.rows += 1
        total = prompt_len + target_len
        self.longest = max(self.longest, total)
        if self.cutoff_len is not None and total > self.cutoff_len:
            self.cut += 1
            if kept_target < target_len:
                self.answer_cut += 1
            if len(self.examples) < 3:
                self.examples.append(f"{where} ({total} tokens)")
        if labelled == 0:
            self.answer_lost += 1

    def message(self, what: str = "rows") -> str | None:
        """One line for the log, or None when nothing was cut."""
        if not self.cut and not self.answer_lost:
            return None
        return (f"{self.cut} of {self.rows} {what} were longer than data.cutoff_len={self.cutoff_len} tokens and were "
                f"cut (longest {self.longest}; e.g. {', '.join(self.examples)}): {self.answer_cut} lost part of their "
                f"answer, {self.answer_lost} lost all of it and train on nothing")

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "cutoff_len": self.cutoff_len, "cut": self.cut, "answer_cut": self.answer_cut,
                "answer_lost": self.answer_lost, "longest": self.longest}


def build_dataset(
    rows: Sequence[Mapping[str, Any]],
    tokenizer,
    template: PromptTemplate | str | None = None,
    cutoff_len: int | None = DEFAULT_CUTOFF_LEN,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    prompt_truncation: Literal["left", "right"] = "left",
    max_examples: int | None = None,
) -> SupervisedDataset:
    """Tokenise validated rows into a :class:`SupervisedDataset` (see :func:`tokenize_row`)."""
    rows = list(rows)
    if max_examples is not None:
        rows = rows[:max_examples]
    if not rows:
        raise DataError("no rows to build a dataset from (empty dataset)")
    template = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
    report = TruncationReport(cutoff_len=cutoff_len)
    features = []
    for i, r in enumerate(rows):
        lengths: dict[str, int] = {}
        f = tokenize_row(r, tokenizer, template, cutoff_len, train_on_inputs, add_eos, prompt_truncation, lengths)
        labelled = sum(1 for x in f["labels"] if x != IGNORE_INDEX)
        where = f"row {i + 1}" + (f" id {r['id']!r}" if isinstance(r, Mapping) and "id" in r else "")
        report.add(where, lengths["prompt"], lengths["target"], lengths["target_kept"], labelled)
        features.append(f)
    return SupervisedDataset(features, [dict(r) for r in rows], report)


def make_supervised_dataset(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    tokenizer,
    template: PromptTemplate | str | None = None,
    format: str = "auto",
    cutoff_len: int | None = DEFAULT_CUTOFF_LEN,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    prompt_truncation: Literal["left", "right"] = "left",
    max_examples: int | None = None,
) -> SupervisedDataset:
    """Load (a path) or validate (a list of rows) and tokenise: the one call a trainer needs."""
    if isinstance(source, (str, os.PathLike)):
        rows = load_rows(source, format=format, max_examples=max_examples)
    else:
        rows = validate_rows(source, format=format)[: max_examples or None]
    return build_dataset(rows, tokenizer, template, cutoff_len, train_on_inputs, add_eos, prompt_truncation)


@dataclass
class DataCollator:
    """Right-pads a list of features to the longest in the batch.

    Args:
        pad_token_id: id used to pad ``input_ids`` (usually ``tokenizer.pad_token_id``).
        label_pad_token_id: value used to pad ``labels`` (-100: ignored by the loss).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Calling it on ``B`` features returns ``{"input_ids": LongTensor [B, L], "attention_mask":
    LongTensor [B, L] (0 on padding), "labels": LongTensor [B, L]}`` with ``L`` the longest length
    (rounded up). Features without ``labels`` produce no ``labels`` key.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollator got an empty batch")
        if self.pad_token_id is None:
            raise ValueError("DataCollator needs a pad_token_id (set tokenizer.pad_token)")
        seqs = [list(map(int, f["input_ids"])) for f in features]
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch = {
            "input_ids": torch.full((len(seqs), length), int(self.pad_token_id), dtype=torch.long),
            "attention_mask": torch.zeros((len(seqs), length), dtype=torch.long),
        }
        has_labels = "labels" in features[0]
        if has_labels:
            batch["labels"] = torch.full((len(seqs), length), self.label_pad_token_id, dtype=torch.long)
        for i, (f, s) in enumerate(zip(features, seqs)):
            n = len(s)
            batch["input_ids"][i, :n] = torch.tensor(s, dtype=torch.long)
            mask = f.get("attention_mask")
            batch["attention_mask"][i, :n] = (
                torch.as_tensor(list(map(int, mask)), dtype=torch.long) if mask is not None else 1
            )
            if has_labels:
                batch["labels"][i, :n] = torch.as_tensor(list(map(int, f["labels"])), dtype=torch.long)
        return batch
