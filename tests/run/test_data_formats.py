"""Contract tests of the data registries (issue 22.2): every registered row format and every file reader goes
through the same checks, so a new one that breaks the contract fails here, not in a user's run."""
from __future__ import annotations

import json

import pytest

from conftest import build_tiny_tokenizer
from molora.run import formats
from molora.run.data import (IGNORE_INDEX, DataError, PromptTemplate, build_dataset, detect_format, load_rows,
                             tokenize_row, validate_rows)
from molora.run.formats import readers

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FORMAT_NAMES = [n for n in formats.format_names() if n != "auto"]


@pytest.fixture(scope="module")
def tok():
    tok = build_tiny_tokenizer(corpus=["<|im_start|>", "<|im_end|>", "user", "assistant", "The sky is blue",
                                       "Add the numbers. 2 and 3 5", "Say yes."], add_bos=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_the_registry_holds_the_three_formats_and_auto():
    assert set(FORMAT_NAMES) == {"choices", "alpaca", "messages"}
    assert formats.format_names()[-1] == "auto"
    with pytest.raises(DataError, match="unknown data format 'csv'.*choices"):
        formats.get_format("csv")
    with pytest.raises(ValueError, match="already registered"):
        formats.register_format(formats.get_format("choices"))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_format_detects_checks_and_tokenizes_its_example(name, tok):
    fmt = formats.get_format(name)
    row = fmt.example()
    assert formats.detect_format(row) is fmt and detect_format(row) == name
    assert fmt.check(fmt.normalise(dict(row))) is None
    # validated the same way explicitly and by detection, and the row survives unchanged in content
    assert validate_rows([row], format=name) == validate_rows([row])
    # a row missing its first field is refused with the location and a message naming the field
    broken = dict(row)
    broken.pop(next(iter(row)))
    with pytest.raises(DataError, match=r"<rows>, row \[0\]"):
        validate_rows([broken], format=name)
    # training features: labels on the target only, nothing labelled outside it, lengths reported
    lengths: dict[str, int] = {}
    feats = tokenize_row(row, tok, cutoff_len=None, lengths=lengths)
    assert len(feats["input_ids"]) == len(feats["labels"]) == len(feats["attention_mask"])
    labelled = [t for t in feats["labels"] if t != IGNORE_INDEX]
    assert 0 < len(labelled) < len(feats["input_ids"]) and lengths["target"] == len(labelled)
    if fmt.uses_prompt_template:  # the target text is what the labels decode to (before the eos)
        prompt, target = PromptTemplate(None).render(row)
        assert tok.decode(labelled[:-1]).strip() == target.strip()
        assert fmt.target(row, prompt) == target
    else:
        with pytest.raises(DataError, match="chat template"):
            PromptTemplate(None).prompt(row)
    ds = build_dataset([row], tok, cutoff_len=None)
    assert ds[0] == feats and ds.truncation.rows == 1


def _write(path, rows, reader):
    if reader == "json":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    if reader == "parquet":
        pq.write_table(table, path)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)


@pytest.mark.parametrize("reader", list(readers.READERS))
def test_every_reader_reads_back_what_was_written_with_locations(reader, tmp_path):
    suffix = (readers.READERS[reader].suffixes or (".jsonl",))[0]
    rows = [{"input": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(3)]
    path = tmp_path / f"rows{suffix}"
    _write(path, rows, reader)
    assert readers.reader_for(path).name == reader
    entries = readers.read_entries(path)
    assert [r for _, r in entries] == rows
    assert len({where for where, _ in entries}) == 3 and all(str(path) in where for where, _ in entries)
    assert load_rows(path) == rows
    # a broken row is named by the reader's location
    bad = rows[:2] + [{"input": "q", "choices": ["a", "b"], "label": 5}]
    _write(path, bad, reader)
    with pytest.raises(DataError, match="label 5 out of range") as err:
        load_rows(path)
    assert str(err.value).startswith(entries[2][0])
    with pytest.raises(DataError, match="file not found"):
        readers.read_entries(tmp_path / f"missing{suffix}")


def test_recipe_format_key_takes_the_registered_names():
    from molora.run.recipe import RecipeError, recipe_from_dict

    for name in formats.format_names():
        recipe_from_dict({"data": {"packaged": "bbc-news", "format": name}})
    with pytest.raises(RecipeError, match="data.format: format='csv' is not a known row format; allowed: "):
        recipe_from_dict({"data": {"packaged": "bbc-news", "format": "csv"}})


def test_detection_order_messages_then_choices_then_alpaca():
    """A chat row that also carries a label is a messages row; a row with choices and an output is a choices row."""
    assert list(formats.format_names()) == ["messages", "choices", "alpaca", "auto"]
    assert detect_format({"messages": [], "label": 0}) == "messages"
    assert detect_format({"choices": ["a"], "output": "x"}) == "choices"
    assert detect_format({"text": "x"}) is None
