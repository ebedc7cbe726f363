"""``molora lm-eval``: lm-evaluation-harness with molora adapters and local tasks from our JSONL files.

lm-eval's ``hf`` model loads an adapter with ``PeftModel.from_pretrained`` (``--model_args
pretrained=BASE,peft=ADAPTER``); PEFT only knows the ``MOLORA`` type once ``molora`` is imported, and the
``lm_eval`` command imports nothing of ours (lm-eval 0.4 has no plugin entry points). So:

* from Python, ``import molora`` before ``lm_eval.simple_evaluate(model="hf", model_args="...,peft=ADAPTER")``;
* from the shell, ``molora lm-eval ARGS`` is ``lm_eval ARGS`` with molora imported, plus ``--jsonl-task
  NAME=FILE`` (repeatable): a local multiple-choice task built from a file in molora's ``choices`` schema
  (``{"input", "choices", "label"}``), no hub involved.

The task scores every option exactly as ``molora eval`` does: the prompt is rendered with molora's template
(``--template``, default ``"{input}\\n{choices}\\nAnswer:"``), each option continues it as ``" " + option``, and
``acc`` is the argmax of the summed log-likelihoods (``acc_norm``: divided by the option's length in characters,
lm-eval's definition; molora's ``accuracy_norm`` divides by UTF-8 bytes, which differs only for non-ASCII text).
lm-eval does not add a BOS token for most models (``add_bos_token=True`` in ``--model_args`` makes it), molora
does when the tokenizer does: pass it for such tokenizers to get identical numbers.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .data import DataError, PromptTemplate, load_rows

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def write_jsonl_task(name: str, data_file: str | Path, task_dir: str | Path, template: Optional[str] = None,
                     max_examples: Optional[int] = None) -> Path:
    """Write an lm-eval task ``name`` for the choices-format rows of ``data_file`` into ``task_dir``.

    ``task_dir/name.yaml`` is the task (lm-eval's ``multiple_choice`` output type on the local ``json`` builder),
    ``task_dir/name.rows.jsonl`` the rows with their rendered ``prompt``. Pass ``task_dir`` to lm-eval as
    ``--include_path`` (or ``TaskManager(include_path=...)``). Returns the YAML's path.

    Raises:
        DataError: a bad task name, an unreadable/invalid file, or rows that are not in the choices format.
    """
    if not _NAME.match(name):
        raise DataError(f"lm-eval task name {name!r}: use letters, digits, '_' or '-' (starting with a letter)")
    rows = load_rows(data_file, format="auto", max_examples=max_examples)
    if "choices" not in rows[0]:
        raise DataError(f"{data_file}: lm-eval tasks are built from choices-format rows ('input', 'choices', "
                        f"'label'); this file is in the alpaca format (free-text answers)")
    tpl = PromptTemplate(template)
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    rows_path = (task_dir / f"{name}.rows.jsonl").resolve()
    with open(rows_path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            prompt = tpl.prompt(row)
            if prompt and prompt[-1].isspace():  # molora then continues with the bare option (choice_target)
                raise DataError(f"{data_file}, row [{i}]: the prompt ends in whitespace; lm-eval always puts "
                                f"target_delimiter ' ' before the option, so the scores would differ from molora's")
            f.write(json.dumps({"prompt": prompt, "choices": list(row["choices"]), "label": int(row["label"]),
                                "id": row.get("id", i)}, ensure_ascii=False) + "\n")
    yaml_path = task_dir / f"{name}.yaml"
    yaml_path.write_text(
        f"# written by `molora lm-eval` from {Path(data_file).resolve()}\n"
        f"task: {name}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(rows_path))}\n"
        f"test_split: test\n"
        f"output_type: multiple_choice\n"
        f"doc_to_text: \"{{{{prompt}}}}\"\n"
        f"doc_to_choice: choices\n"
        f"doc_to_target: label\n"
        f"target_delimiter: \" \"\n"
        f"metric_list:\n"
        f"  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        f"  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        f"metadata:\n  version: 1.0\n",
        encoding="utf-8")
    return yaml_path


def _parse_task(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise DataError(f"--jsonl-task {spec!r}: expected NAME=FILE, e.g. --jsonl-task bbc=runs/quickstart/data/"
                        f"validation.jsonl")
    return name, path


def _resolve_model_args(args: list[str]) -> list[str]:
    """``--model_args`` with packaged model names (``pretrained=smollm2-135m``, also ``tokenizer=``) replaced by
    their converted checkpoint folders; a model that is neither packaged, a folder nor in the local Hugging Face
    cache is refused in one line (hub downloads are off) instead of lm-eval's traceback."""
    from .assets import PACKAGED_MODELS, AssetError, packaged_model_dir

    out = list(args)
    for i, a in enumerate(out):
        if a == "--model_args" and i + 1 < len(out):
            j, value = i + 1, out[i + 1]
        elif a.startswith("--model_args="):
            j, value = i, a.split("=", 1)[1]
        else:
            continue
        parts = []
        for item in value.split(","):
            k, sep, v = item.partition("=")
            if sep and k.strip() in ("pretrained", "tokenizer"):
                v = v.strip()
                if v in PACKAGED_MODELS:
                    try:
                        v = str(packaged_model_dir(v))
                    except AssetError as e:
                        raise ValueError(str(e)) from None
                elif not Path(v).expanduser().is_dir() and not _in_hf_cache(v):
                    raise ValueError(f"--model_args {k.strip()}={v}: not a packaged model, a local folder, or a model "
                                     f"in the local Hugging Face cache (hub downloads are disabled in molora); "
                                     f"packaged models: {', '.join(sorted(PACKAGED_MODELS))}")
            parts.append(f"{k}{sep}{v}")
        new = ",".join(parts)
        out[j] = new if j != i else f"--model_args={new}"
    return out


def _in_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub library cannot even parse is not in the cache
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="molora lm-eval", add_help=False,
        description="lm-evaluation-harness with molora imported (so `--model_args ...,peft=ADAPTER` loads a molora "
                    "adapter), plus local tasks from molora JSONL files. Every other argument goes to lm_eval.")
    p.add_argument("--jsonl-task", action="append", default=[], metavar="NAME=FILE",
                   help="a multiple-choice task NAME from a choices-format JSONL file (repeatable)")
    p.add_argument("--template", default=None, help="molora prompt template for --jsonl-task (default: molora's)")
    p.add_argument("--task-max-examples", type=int, default=None, help="first N rows of each --jsonl-task file")
    p.add_argument("--task-dir", default=None, help="where to write the task YAMLs (default: a temporary folder)")
    p.add_argument("-h", "--help", action="store_true")
    ours, rest = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if ours.help:
        p.print_help()
        print("\nlm_eval's own options follow (`lm_eval run --help`).")
        return 0
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("molora lm-eval: lm-evaluation-harness is not installed; pip install 'molora[lm-eval]' "
              "(or lm-eval>=0.4.13,<0.5)", file=sys.stderr)
        return 2
    tmp = None
    try:
        specs = [_parse_task(s) for s in ours.jsonl_task]
        if specs:
            task_dir = ours.task_dir or (tmp := tempfile.TemporaryDirectory(prefix="molora-lm-eval-")).name
            for name, path in specs:
                print(f"molora: lm-eval task {name!r} <- {path}: "
                      f"{write_jsonl_task(name, path, task_dir, ours.template, ours.task_max_examples)}",
                      file=sys.stderr)
            rest = [*rest, "--include_path", str(task_dir)]
    except DataError as exc:
        print(f"molora lm-eval: {exc}", file=sys.stderr)
        return 2
    try:
        rest = _resolve_model_args(rest)
    except (DataError, ValueError) as exc:
        print(f"molora lm-eval: {exc}", file=sys.stderr)
        return 2
    import molora

    molora.register()  # PEFT now knows the MOLORA adapter type
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *rest]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse errors and --help exit
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    finally:
        sys.argv = saved
        if tmp is not None:
            tmp.cleanup()
    return 0
