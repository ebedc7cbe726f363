"""``molora merge-experts RECIPE.yaml --adapter DIR --max-experts N [--out DIR] [--calib-examples K]``: fewer
experts per layer after training (see :mod:`molora.tuner.merge`), with the accuracy change it costs.

Reads K of the recipe's training rows to measure each layer's expert usage, merges every layer with more than N
experts down to N, scores the adapter before and after on the recipe's evaluation rows (the protocol of
``molora eval``), measures the change of next-token log-probabilities on K other training rows (held out from
the calibration), prints a table (layer, experts before -> after, groups, exact on the calibration tokens and on
the held-out ones) and writes the merged adapter (default: ``<adapter>-merged<N>``) with ``merge_report.json`` beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]


def _parse(argv: Sequence[str]):
    p = argparse.ArgumentParser(
        prog="molora merge-experts",
        description="Fewer experts per layer after training, with the accuracy change it costs. Reads K training rows "
                    "to measure each layer's expert usage, merges every layer with more than N experts down to N, "
                    "scores the adapter before and after on the recipe's evaluation rows, measures the change of "
                    "next-token log-probabilities on K held-out training rows, and writes the merged adapter with "
                    "merge_report.json beside it.")
    p.add_argument("recipe", help="the recipe the adapter was trained with (its data and template)")
    p.add_argument("--adapter", required=True, help="the trained adapter (or checkpoint) directory")
    p.add_argument("--max-experts", type=int, required=True, help="experts per layer after merging (>= 1)")
    p.add_argument("--out", default=None, help="where to write the merged adapter")
    p.add_argument("--calib-examples", type=int, default=64, help="training rows that measure expert usage")
    return p.parse_known_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .recipe import RecipeError, load_recipe, parse_overrides

    a, rest = _parse(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(a.recipe, parse_overrides(rest))
        if a.max_experts < 1:
            raise RecipeError(f"--max-experts={a.max_experts} must be >= 1")
        if a.calib_examples < 1:
            raise RecipeError(f"--calib-examples={a.calib_examples} must be >= 1")
        adapter = Path(a.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeError(f"--adapter {adapter}: no adapter_config.json there")
    except (RecipeError, ValueError) as e:
        print(f"molora merge-experts: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else adapter.with_name(f"{adapter.name}-merged{a.max_experts}")
    problem = _out_problem(adapter, out)
    if problem:
        print(f"molora merge-experts: error: {problem}", file=sys.stderr)
        return 2
    try:
        return _run(recipe, adapter, out, a.max_experts, a.calib_examples)
    except Exception as e:  # noqa: BLE001 - a user error is one line, anything else a traceback
        from ..tuner.merge import MergeError
        from .common import is_user_error

        if is_user_error(e) or isinstance(e, MergeError):
            print(f"molora merge-experts: error: {e}", file=sys.stderr)
            return 2
        raise


def _out_problem(adapter: Path, out: Path) -> Optional[str]:
    """Why ``--out`` cannot receive the merged adapter (checked before any work), or None."""
    if out.resolve() == adapter.resolve():
        return (f"--out {out} is the source adapter: the merge would overwrite it (and leave its completion marker "
                f"describing other weights); give another folder")
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            return f"--out {out}: {p} is a file, not a folder"
    if adapter.resolve() in out.resolve().parents:
        return f"--out {out} lies inside the source adapter {adapter}; give a folder beside it"
    return None


def _run(recipe, adapter: Path, out: Path, max_experts: int, calib_examples: int) -> int:
    import molora

    from ..tuner.merge import expert_loads, merge_experts, next_token_scores, output_change
    from .allocate import calibration_batches
    from .checkpoint import load_adapter_checked, read_adapter_tensors
    from .common import RunError, load_base_model, load_recipe_rows, write_json_atomic
    from .data import PromptTemplate
    from .eval_run import recipe_accuracy

    molora.register()
    train_rows, eval_rows, _ = load_recipe_rows(recipe, Path(recipe.train.output_dir), is_main=True)
    if not eval_rows or "choices" not in eval_rows[0]:
        raise RunError("the recipe has no evaluation rows in the choices format: the merge's cost cannot be measured")
    checked = read_adapter_tensors(adapter)
    base, tokenizer = load_base_model(recipe)
    model = load_adapter_checked(base, adapter, checked=checked)
    model.eval()
    template = PromptTemplate(recipe.data.prompt_template)
    before = recipe_accuracy(model, tokenizer, eval_rows, template, recipe, False)
    import random

    # calibration rows measure the usage; as many other rows (held out from the calibration) measure the change
    order = random.Random(recipe.train.seed).sample(range(len(train_rows)), len(train_rows))
    calib_rows = [train_rows[i] for i in order[:calib_examples]]
    held_rows = [train_rows[i] for i in order[calib_examples:2 * calib_examples]]

    def _batches(rows):
        return calibration_batches(rows, tokenizer, template, recipe.data.cutoff_len, len(rows),
                                   seed=recipe.train.seed, train_on_inputs=recipe.data.train_on_inputs) if rows else []

    batches, held = _batches(calib_rows), _batches(held_rows)
    loads = expert_loads(model, batches)
    held_loads = expert_loads(model, held) if held else {}
    scores_before = next_token_scores(model, held)
    report = merge_experts(model, max_experts, loads, adapter=model.active_adapter)
    after = recipe_accuracy(model, tokenizer, eval_rows, template, recipe, False)
    change = output_change(scores_before, next_token_scores(model, held))
    import shutil

    tmp = out.with_name(f".{out.name}.tmp-{__import__('os').getpid()}")  # written whole, then renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    lines = [f"{'layer':>5}  {'experts':>9}  {'calib':>5}  {'held':>5}  groups (old experts, centre first)",
             "-" * 70]
    for r in report:
        removed = [e for g in r.groups for e in g[1:]]
        hl = held_loads.get(r.layer)
        r.exact_heldout = (None if hl is None else bool(r.exact and all(hl[e] == 0.0 for e in removed)))
        groups = " ".join("[" + ",".join(str(e) for e in g) + "]" for g in r.groups) if r.after < r.before else "-"
        held_txt = "-" if r.exact_heldout is None else ("yes" if r.exact_heldout else "no")
        lines.append(f"{str(r.layer):>5}  {r.before:>3} -> {r.after:<3}  {'yes' if r.exact else 'no':>5}  "
                     f"{held_txt:>5}  {groups}")
    acc = {k: (before[k]["accuracy"], after[k]["accuracy"]) for k in before if isinstance(before[k], dict)
           and k in after}
    lines.append("-" * 70)
    for k, (b, a) in acc.items():
        lines.append(f"{k} accuracy on {after[k]['n']} eval rows: {b:.4f} -> {a:.4f} ({a - b:+.4f})")
    exact = bool(change["tokens"] and change["exact"] and all(r.exact_heldout for r in report))
    if not change["tokens"]:
        lines.append("exactness not measured: no training rows are left beside the calibration rows "
                     "(lower --calib-examples)")
    elif exact:
        lines.append(f"exact on {change['tokens']} held-out tokens (largest next-token log-prob change "
                     f"{change['max_abs_logprob']:.1e})")
    else:
        lines.append(f"lossy on {change['tokens']} held-out tokens: next-token log-prob changes by up to "
                     f"{change['max_abs_logprob']:.3g} (mean {change['mean_abs_logprob']:.3g}), logits by up to "
                     f"{change['max_abs_logit']:.3g}, top prediction changed on {100 * change['argmax_changed']:.1f} %"
                     f" (the accuracy change above is the cost)")
    print("\n".join(lines))
    write_json_atomic(tmp / "merge_report.json", {
        "adapter": str(adapter), "max_experts": max_experts, "calib_examples": calib_examples,
        "layers": [r.__dict__ for r in report], "accuracy_before": before, "accuracy_after": after,
        "exact_on_calibration": all(r.exact for r in report), "heldout_rows": len(held_rows),
        "heldout_change": change, "exact": exact})
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print(f"molora merge-experts: wrote {out}")
    return 0
