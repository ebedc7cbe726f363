"""``molora generate`` and ``molora chat``: talk to a tuned model with its recipe's prompt template.

    molora generate RECIPE.yaml [--adapter DIR|none] (--prompt TEXT ... | --file ROWS.jsonl) [--output OUT.jsonl]
                    [--raw] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--batch-size B]
    molora chat RECIPE.yaml [--adapter DIR|none] [--max-new-tokens N] [--temperature T] [--top-p P] [--system TEXT]

``generate`` renders each prompt with the recipe's ``data.prompt_template`` (``--prompt TEXT`` fills ``{input}``;
``--raw`` sends the text as it is; ``--file`` takes choices or alpaca rows, as training does), generates in batches
(left-padded, greedy by default, sampled with ``--temperature`` > 0) and prints the completions, or writes them as
JSONL (``{"prompt", "completion", ...the row's fields}``) with a progress bar. ``chat`` is an interactive loop for chat
models: the conversation so far goes through the tokenizer's chat template each turn (``/reset`` clears it, an
empty line or end of input quits). The adapter is ``<train.output_dir>/adapter`` unless ``--adapter`` names another
(``none``: the untuned model); a missing adapter, or one trained for another model or allocation, is refused in one
line before generating anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main_generate", "main_chat"]


class GenerateError(ValueError):
    """A request that cannot be served (the message names the value and what is allowed)."""


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the recipe the adapter was trained with (model, prompt template)")
    p.add_argument("--adapter", default=None, help="adapter or checkpoint folder (default <train.output_dir>/adapter); "
                                                   "none: the untuned model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _check_sampling(a) -> None:
    if a.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens={a.max_new_tokens} must be >= 1")
    if not a.temperature >= 0:
        raise GenerateError(f"--temperature={a.temperature} must be >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        raise GenerateError(f"--top-p={a.top_p} must be in (0, 1]")


def _load(recipe_path: str, adapter_arg: Optional[str], overrides: Sequence[str]):
    """(recipe, model, tokenizer); GenerateError for a missing or mismatched adapter (one line)."""
    from .common import load_base_model
    from .recipe import load_recipe, parse_overrides

    recipe = load_recipe(recipe_path, parse_overrides(overrides))
    adapter = None if adapter_arg == "none" else Path(adapter_arg or Path(recipe.train.output_dir) / "adapter")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise GenerateError(f"{adapter} is not an adapter folder (no adapter_config.json); train first, or pass "
                            f"--adapter DIR (an adapter or checkpoint folder) or --adapter none")
    checked = None
    if adapter is not None:
        from .checkpoint import read_adapter_tensors

        checked = read_adapter_tensors(adapter)
    model, tokenizer = load_base_model(recipe)
    if adapter is not None:
        import molora

        from .checkpoint import load_adapter_checked

        molora.register()
        try:
            model = load_adapter_checked(model, adapter, checked=checked)
        except (ValueError, RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GenerateError(f"the adapter {adapter} does not fit {recipe.model.name_or_path}: {first}") from None
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return recipe, model, tokenizer


def _report_user_error(prog: str, e: BaseException) -> bool:
    """Print a user error as one line (True); False for anything else (the caller re-raises it)."""
    from .common import is_user_error
    from .recipe import RecipeError

    if isinstance(e, (GenerateError, RecipeError)) or is_user_error(e):
        print(f"{prog}: error: {e}", file=sys.stderr)
        return True
    return False


def _generate(model, tokenizer, prompts: list[str], a, progress: bool = False) -> list[str]:
    """Completions of ``prompts`` (already rendered), ``a.batch_size`` at a time, left-padded."""
    import torch
    from tqdm import tqdm

    device = next(model.parameters()).device
    out: list[str] = []
    sample = a.temperature > 0
    gen = dict(max_new_tokens=a.max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if sample:
        gen.update(temperature=a.temperature, top_p=a.top_p)
        torch.manual_seed(a.seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(prompts), a.batch_size), desc="generate", unit="batch", disable=not progress,
                          leave=False):
            enc = tokenizer(prompts[start:start + a.batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, **gen)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def _prompts(recipe, a) -> tuple[list[str], list[dict[str, Any]]]:
    from .data import DataError, PromptTemplate, load_rows

    template = PromptTemplate(recipe.data.prompt_template)
    if a.file:
        rows = load_rows(a.file)
        try:
            return [template.prompt(r) for r in rows], rows
        except DataError as e:
            raise GenerateError(f"--file {a.file}: {e}") from None
    rows = [{"input": t} for t in a.prompt]
    if a.raw:
        return list(a.prompt), rows
    other = sorted(template.fields - {"input"})
    if template.template is not None and other:
        raise GenerateError(f"the recipe's prompt template needs {', '.join('{' + f + '}' for f in other)} besides "
                            f"{{input}}: pass rows with --file, or --raw to send the text as it is")
    text = template.template or "{input}\nAnswer:"
    return [text.format(input=t) for t in a.prompt], rows


def main_generate(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="molora generate", description="Completions of prompts with a tuned model, "
                                                                    "rendered with its recipe's prompt template.")
    _common_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable); fills the template's {input}")
    src.add_argument("--file", help="JSONL (or JSON/Parquet) rows in the choices or alpaca format")
    p.add_argument("--raw", action="store_true", help="send --prompt texts as they are (no template)")
    p.add_argument("--output", default=None, help="write JSONL here instead of printing")
    p.add_argument("--batch-size", type=int, default=8)
    a, rest = p.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        _check_sampling(a)
        if a.batch_size < 1:
            raise GenerateError(f"--batch-size={a.batch_size} must be >= 1")
        if a.file and not Path(a.file).is_file():
            raise GenerateError(f"--file {a.file}: no such file")
        recipe, model, tokenizer = _load(a.recipe, a.adapter, rest)
        prompts, rows = _prompts(recipe, a)
        completions = _generate(model, tokenizer, prompts, a, progress=a.output is not None)
    except Exception as e:  # noqa: BLE001 - user errors become one line
        if _report_user_error("molora generate", e):
            return 2
        raise
    if a.output:
        from .common import write_text_atomic

        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, "".join(json.dumps({**row, "prompt": prompt, "completion": text}, ensure_ascii=False)
                                       + "\n" for row, prompt, text in zip(rows, prompts, completions)))
        print(f"molora generate: {len(completions)} completions -> {out}")
    else:
        for prompt, text in zip(prompts, completions):
            print(f"{prompt}{text}\n" + "-" * 40)
    return 0


def main_chat(argv: Optional[Sequence[str]] = None, stdin=None) -> int:
    p = argparse.ArgumentParser(prog="molora chat", description="An interactive chat with a tuned chat model (the "
                                                                "tokenizer's chat template).")
    _common_args(p)
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    a, rest = p.parse_known_args(argv)
    a.batch_size = 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stdin = stdin or sys.stdin
    try:
        _check_sampling(a)
        recipe, model, tokenizer = _load(a.recipe, a.adapter, rest)
        if not getattr(tokenizer, "chat_template", None):
            raise GenerateError(f"{recipe.model.name_or_path}'s tokenizer has no chat template: use molora generate")
    except Exception as e:  # noqa: BLE001 - user errors become one line
        if _report_user_error("molora chat", e):
            return 2
        raise
    history: list[dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
    print("molora chat: an empty line or end of input quits, /reset starts over", flush=True)
    while True:
        print("> ", end="", flush=True)
        line = stdin.readline()
        if not line or not line.strip():
            return 0
        if line.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        reply = _generate(model, tokenizer, [prompt], a)[0].strip()
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
