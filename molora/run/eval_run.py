"""``molora eval RECIPE.yaml [--adapter DIR|none] [--output FILE] [--section.key value ...]``: score a saved adapter.

Measures the accuracy of a trained adapter (``OUTPUT_DIR/adapter`` by default, or any checkpoint directory) or of
the untuned model (``--adapter none``) on the recipe's evaluation rows, with the recipe's prompt template,
``cutoff_len`` and ``eval`` settings -- the same protocol ``molora train`` runs before and after training, so the
numbers are comparable. Writes the result atomically to ``--output`` (default: ``eval_results.json`` in the
adapter directory, or ``OUTPUT_DIR/eval_base.json`` for ``none``) and prints it.

Everything that can be checked without loading a model (the recipe, the adapter directory, the eval data) is
checked first; an adapter trained with another allocation or for another model fails with PEFT's error.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .recipe import RecipeError, load_recipe, parse_overrides

__all__ = ["main", "evaluate_adapter"]

USAGE = """usage: molora eval RECIPE.yaml [--adapter DIR|none] [--output FILE] [--section.key VALUE ...]

  RECIPE.yaml         the recipe the adapter was trained with (model, data, eval settings)
  --adapter DIR|none  adapter or checkpoint directory (default: <train.output_dir>/adapter); none = untuned model
  --output FILE       where to write the JSON result (default: eval_results.json beside the adapter)"""


def _parse(argv: Sequence[str]) -> tuple[Optional[str], Optional[str], Optional[str], list, bool]:
    recipe = adapter = output = None
    rest: list[str] = []
    args, i = list(argv), 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            return None, None, None, [], True
        if a in ("--adapter", "--output"):
            if i + 1 >= len(args):
                raise RecipeError(f"{a} needs a value")
            if a == "--adapter":
                adapter = args[i + 1]
            else:
                output = args[i + 1]
            i += 2
        elif not a.startswith("--") and recipe is None:
            recipe, i = a, i + 1
        else:
            rest.append(a)
            i += 1
    if recipe is None:
        raise RecipeError("no recipe given (e.g. molora eval recipes/quickstart_cpu.yaml)")
    return recipe, adapter, output, parse_overrides(rest), False


def evaluate_adapter(recipe, adapter: Optional[Path], progress: bool = True) -> dict[str, Any]:
    """Accuracy of ``adapter`` (None: the untuned model) under ``recipe``: ``{"loglik": ..., "generation": ...}``."""
    from .data import PromptTemplate
    from .common import RunError, load_base_model, load_recipe_rows as _load_rows

    out = Path(recipe.train.output_dir)
    _, rows, _ = _load_rows(recipe, out, is_main=True)
    if not rows or "choices" not in rows[0]:
        raise RunError("the recipe has no evaluation rows in the choices format (data.eval_file, or a packaged set)")
    if adapter is not None:
        from .checkpoint import read_adapter_tensors

        checked = read_adapter_tensors(adapter)  # a broken or non-finite adapter fails before the model loads
    model, tokenizer = load_base_model(recipe)
    if adapter is not None:
        import molora

        from .checkpoint import load_adapter_checked

        molora.register()  # under the `molora` command the package was imported without registering
        model = load_adapter_checked(model, adapter, checked=checked)
    model.eval()
    return recipe_accuracy(model, tokenizer, rows, PromptTemplate(recipe.data.prompt_template), recipe, progress,
                           predictions=recipe.eval.save_predictions)


def recipe_accuracy(model, tokenizer, rows, template, recipe, progress: bool = True,
                    predictions: bool = False) -> dict[str, Any]:
    """Loglik and/or generation accuracy of ``model`` on ``rows`` with the recipe's ``eval`` settings and
    ``data.cutoff_len`` (the protocol of ``molora train`` before/after and of ``molora eval``); each entry
    also has its wall time in ``seconds`` and its speed in ``examples_per_s``. ``predictions``: the loglik entry
    also holds ``"predictions"`` (per question: id, label, pred, pred_norm, option scores)."""
    from .evaluation import evaluate_generation, evaluate_loglik

    e, d = recipe.eval, recipe.data
    result: dict[str, Any] = {}
    if e.loglik:
        t0 = time.perf_counter()
        r = evaluate_loglik(model, tokenizer, rows, template, batch_size=e.batch_size,
                            max_examples=e.loglik_max_examples, cutoff_len=d.cutoff_len, progress=progress,
                            return_predictions=predictions)
        dt = time.perf_counter() - t0
        result["loglik"] = {**r, "seconds": round(dt, 1), "examples_per_s": round(r["n"] / max(dt, 1e-9), 2)}
    if e.generation:
        t0 = time.perf_counter()
        r = evaluate_generation(model, tokenizer, rows, template, max_new_tokens=e.max_new_tokens,
                                batch_size=e.batch_size, max_examples=e.generation_max_examples,
                                cutoff_len=d.cutoff_len, progress=progress)
        result["generation"] = {**r, "seconds": round(time.perf_counter() - t0, 1)}
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``molora eval``; returns the exit code."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time
    try:
        recipe_path, adapter_arg, output_arg, overrides, want_help = _parse(argv)
        if want_help:
            print(USAGE)
            return 0
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as e:
        print(f"molora eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(recipe.train.output_dir)
    adapter = None if adapter_arg == "none" else Path(adapter_arg) if adapter_arg else out / "adapter"
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        print(f"molora eval: error: {adapter} is not an adapter directory (no adapter_config.json); train first, "
              f"or pass --adapter DIR (an adapter or checkpoint directory) or --adapter none", file=sys.stderr)
        return 2
    output = Path(output_arg) if output_arg else (adapter / "eval_results.json" if adapter else out / "eval_base.json")

    from .common import is_user_error as _is_user_error, write_json_atomic as _write_json_atomic

    try:
        result = evaluate_adapter(recipe, adapter)
    except Exception as e:  # noqa: BLE001 - known user-facing errors become one line, others propagate
        if _is_user_error(e) or isinstance(e, (RecipeError, ValueError)):
            print(f"molora eval: error: {e}", file=sys.stderr)
            return 2
        raise
    record = {"adapter": str(adapter) if adapter else None, "recipe": recipe_path, "accuracy": result}
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(output, record)
    for kind, r in result.items():
        norm = f", accuracy_norm {r['accuracy_norm']:.3f}" if "accuracy_norm" in r else ""
        print(f"molora eval: {kind} accuracy {r['accuracy']:.3f}{norm} (n={r['n']})")
    print(f"  results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
