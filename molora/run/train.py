"""``molora train RECIPE.yaml [--section.key value ...] [--resume latest|PATH]``: fine-tune a MoLoRA adapter.

Runs as one process or under the DeepSpeed launcher (ZeRO-1/2/3, one node or many)::

    molora train recipes/quickstart_cpu.yaml --train.max_steps 20
    deepspeed --num_gpus 8 --module molora train recipes/paper/rte.yaml --train.deepspeed recipes/deepspeed/zero2.json

What happens, in order: the recipe is validated (:mod:`molora.run.recipe`; nothing heavy is loaded before), the
MoLoRA config is built (allocation errors surface here), the data is prepared (a packaged data set is written
to ``OUTPUT_DIR/data``), the model is loaded, wrapped with :func:`peft.get_peft_model`, and trained with the
Hugging Face :class:`~transformers.Trainer` (and its DeepSpeed integration when ``train.deepspeed`` is set).
Accuracy is measured before and after training (:mod:`molora.run.evaluation`), the adapter is saved to
``OUTPUT_DIR/adapter`` and plots are written (:mod:`molora.run.report`).

Design notes (why the Trainer is subclassed):

* **Aux loss.** The model's ``loss`` already includes ``aux_loss_coef * aux`` (as a value) and the core injects
  the aux gradient into the routers directly (see :mod:`molora.tuner.router_state`), scaled by the gradient that
  reaches the returned loss -- so the Trainer's ``1 / gradient_accumulation_steps`` and fp16 loss scaling
  (HF or DeepSpeed) apply to it as to the task loss. When the Trainer normalises the task loss by the step's
  token count instead (``num_items_in_batch``) it does not divide by the accumulation steps and multiplies the
  loss by the world size: the forward's aux gradient then gets an explicit ``1 / (GA * world)`` and the logged
  ``loss`` is corrected the same way, so the objective is ``task + coef * mean(aux)`` over the step's
  micro-batches (DeepSpeed/DDP then average over ranks as for the task gradient). ``task_loss`` and
  ``aux_loss`` (unweighted) are logged separately.
* **Atomic checkpoints** (:mod:`molora.run.checkpoint`): ``_save_checkpoint`` writes into a staging directory, rank
  0 fsyncs it, writes a completion marker last and renames it into place; resume requires the marker.
* **Adapter saving** gathers only the adapter parameters under ZeRO-3 (never empty files, never the base model).
* **Telemetry** (:mod:`molora.run.telemetry`): router statistics are accumulated over every micro-batch of a logging
  interval, all-reduced over ranks, and written with loss, aux loss, lr and tokens/s to ``metrics.jsonl`` and
  wandb (offline unless an API key is available; it never prompts).

:func:`run` calls the named steps of :mod:`.train_steps` in order (recipe, data, model, trainer, results); the
Trainer subclass is :mod:`.trainer_class`, the shared helpers :mod:`.common` and :mod:`.train_support`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .common import RunError, barrier, is_user_error, rank_info
from .recipe import Recipe, RecipeError, load_recipe, parse_overrides
from .trainer import build_trainer_class as _build_trainer_class  # a module global: tests patch it here

__all__ = ["main", "run", "parse_cli", "RunError"]

USAGE = """usage: molora train RECIPE.yaml [--section.key VALUE ...] [--resume latest|PATH] [--resume-allow KEYS]
                    [--validate]
       molora train --keys [SECTION]

  RECIPE.yaml           a recipe (see recipes/): model, data, allocation, train, eval, report
  --section.key VALUE   override a recipe value, e.g. --train.max_steps 20 --allocation.num_experts 2,4,6,8
  --deepspeed PATH      same as --train.deepspeed PATH (a DeepSpeed JSON config)
  --resume latest|PATH  continue from the newest complete checkpoint of train.output_dir, or from PATH
  --resume-allow KEYS   resume although these recipe keys or sections differ from the checkpoint's
                        (e.g. train.learning_rate,data; 'all' accepts every difference)
  --validate            check the recipe (and overrides), print it resolved, and exit
  --keys [SECTION]      list every recipe key (of one section) with its default and, where known, what it does
Under DeepSpeed: deepspeed --num_gpus N --module molora train RECIPE.yaml [...]"""


# ================================================================================================ command line


@dataclass
class CliOptions:
    recipe: Optional[str] = None
    overrides: list = field(default_factory=list)
    resume: Optional[str] = None
    resume_allow: Optional[str] = None
    validate: bool = False
    help: bool = False
    keys: Optional[str] = None   # "" for every section


#: flags of ``molora train`` that take a value -> what the value is (for the error when it is missing)
_VALUE_FLAGS = {"--resume": "latest or a checkpoint directory",
                "--resume-allow": "recipe keys or sections (e.g. train.learning_rate,data), or all"}


def parse_cli(argv: Sequence[str]) -> CliOptions:
    """Split argv into recipe path, ``--resume``, ``--validate`` and overrides; drop the launcher's
    ``--local_rank``."""
    opts = CliOptions()
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            opts.help = True
            i += 1
        elif a.startswith("--local_rank") or a.startswith("--local-rank"):
            i += 1 if "=" in a else 2
        elif a.split("=", 1)[0] in _VALUE_FLAGS:
            flag = a.split("=", 1)[0]
            if "=" in a:
                value, i = a.split("=", 1)[1], i + 1
            elif i + 1 < len(args):
                value, i = args[i + 1], i + 2
            else:
                raise RecipeError(f"{flag} needs a value: {_VALUE_FLAGS[flag]}")
            setattr(opts, flag[2:].replace("-", "_"), value)
        elif a == "--keys":
            has_section = i + 1 < len(args) and not args[i + 1].startswith("-")
            opts.keys = args[i + 1] if has_section else ""
            i += 2 if has_section else 1
        elif a in ("--validate", "--dry-run"):
            opts.validate = True
            i += 1
        elif not a.startswith("--") and opts.recipe is None:
            opts.recipe = a
            i += 1
        else:
            rest.append(a)
            i += 1
    opts.overrides = parse_overrides(rest)
    if opts.resume_allow and not opts.resume:
        raise RecipeError("--resume-allow applies to a resume: add --resume latest (or a checkpoint path)")
    if opts.recipe is None and not opts.help and opts.keys is None:
        raise RecipeError("no recipe given (e.g. molora train recipes/quickstart_cpu.yaml)")
    return opts


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``molora train`` and ``python -m molora.run.train``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face library reads it
    try:
        opts = parse_cli(argv)
        if opts.help:
            print(USAGE)
            return 0
        if opts.keys is not None:
            from .recipe_keys import recipe_keys

            print(recipe_keys(opts.keys or None))
            return 0
        recipe = load_recipe(opts.recipe, opts.overrides)
        from .recipe import model_location_problem

        problem = model_location_problem(recipe.model.name_or_path)
        if problem:
            raise RecipeError(problem)
        layers = _check_allocation_early(recipe, show_warnings=opts.validate)
    except RecipeError as e:
        print(f"molora train: error: {e}", file=sys.stderr)
        return 2
    if opts.validate:
        print(recipe.to_yaml(), end="")
        if layers is not None:
            print(f"# allocation resolved for {recipe.model.name_or_path} ({len(layers)} layers): "
                  f"{_allocation_runs(layers)}")
        else:
            print(f"# allocation: the layer count of {recipe.model.name_or_path} is not known before it loads; "
                  f"checked when the model is loaded")
        return 0
    try:
        run(recipe, resume=opts.resume, resume_allow=opts.resume_allow)
    except RecipeError as e:
        print(f"molora train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - known user-facing errors become one line, others propagate
        if is_user_error(e):
            print(f"molora train: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


def _check_allocation_early(recipe: Recipe, show_warnings: bool) -> Optional[list]:
    """Resolve the allocation from the model's config.json before anything loads (errors: RecipeError). With
    ``show_warnings`` the allocation warnings are printed as one line each (a run prints them at injection)."""
    import warnings

    from .recipe import resolve_recipe_allocation

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = resolve_recipe_allocation(recipe)
    if show_warnings:
        for w in caught:
            print(f"molora train: warning: {w.message}", file=sys.stderr)
    return layers


def _allocation_runs(layers: list) -> str:
    """``layers 0-7: 2 experts, top_k 2, r 8; ... (total N experts)`` for a resolved allocation."""
    from ..allocation import specs as allocation_specs

    split = any(a.num_experts_mlp is not None for a in layers)
    runs = allocation_specs.describe_runs([a.num_experts for a in layers], [a.top_k for a in layers],
                                          [a.r for a in layers],
                                          [a.num_experts_mlp for a in layers] if split else None)
    if split:
        return (f"{runs} (total {sum(a.num_experts for a in layers)} attention + "
                f"{sum(a.num_experts_mlp for a in layers)} MLP experts)")
    return f"{runs} (total {sum(a.num_experts for a in layers)} experts)"


# ================================================================================================ run


def run(recipe: Recipe, resume: Optional[str] = None, resume_allow: Optional[str] = None) -> dict[str, Any]:
    """Train (and evaluate, save, plot) as the recipe says. Returns a summary dict (on every rank; the paths and
    numbers are filled in on rank 0).

    ``resume``: ``"latest"`` or a checkpoint path; the checkpoint's setup and fingerprint must match this run
    (:mod:`molora.run.resume`) except for the keys in ``resume_allow`` (comma-separated keys/sections or ``all``).
    The output folder is locked for the whole run (:mod:`molora.run.run_lock`): a second run on it fails at once
    naming the holder."""
    from .run_lock import output_dir_lock
    from .storage import check_writable

    out = Path(recipe.train.output_dir)
    check_writable(out)  # before anything loads: a read-only or impossible output_dir fails now
    with output_dir_lock(out, enabled=rank_info()[0] == 0):
        return _run_locked(recipe, resume, resume_allow)


def _run_locked(recipe: Recipe, resume: Optional[str], resume_allow: Optional[str]) -> dict[str, Any]:
    """The steps of a run, in order (:mod:`.train_steps`)."""
    from . import train_steps as steps

    run = steps.TrainRun(recipe, resume=resume, resume_allow=resume_allow)
    steps.start(run)
    steps.build_config(run)  # allocation and resume target: fail before anything heavy
    steps.resume_target(run)
    steps.deepspeed_config(run)
    finished = steps.check_resume_setup(run)
    if finished is not None:
        return finished
    steps.distributed_setup(run)  # torch.distributed / DeepSpeed; ZeRO-3 then loads the model partitioned
    steps.load_data(run)
    steps.build_model(run)
    steps.build_datasets(run)
    steps.run_context(run)
    steps.make_trainer(run, _build_trainer_class())
    steps.train(run)
    adapter_dir = steps.save_final_adapter(run)  # ---- final adapter (atomic), accuracy after, results, plots
    summary = steps.finish(run, adapter_dir)
    if run.is_main:
        _print_summary(summary, recipe)
    barrier()
    return summary


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _print_summary(summary: dict, recipe: Recipe) -> None:
    lines = [f"molora: done in {_fmt_s(summary['timings']['total_s'])} "
             f"(training {_fmt_s(summary['timings'].get('train_s', 0))}, {summary['global_step']} steps)"]
    if summary.get("nonfinite_skipped_steps"):
        lines.append(f"  warning:  {summary['nonfinite_skipped_steps']} steps were skipped for non-finite losses or "
                     f"gradients (train.nonfinite: skip)")
    acc = summary["accuracy"]
    for kind in ("loglik", "generation"):
        b = (acc.get("before") or {}).get(kind)
        a = (acc.get("after") or {}).get(kind)
        if a or b:
            n = (a or b)["n"]
            lines.append(f"  accuracy ({kind}, {n} rows): "
                         f"{'before %.3f' % b['accuracy'] if b else 'before -'} -> "
                         f"{'after %.3f' % a['accuracy'] if a else 'after -'}")
            if (a or b or {}).get("accuracy_norm") is not None:
                lines.append(f"  accuracy_norm ({kind}, per byte of the option): "
                             f"{'before %.3f' % b['accuracy_norm'] if b else 'before -'} -> "
                             f"{'after %.3f' % a['accuracy_norm'] if a else 'after -'}")
    lines.append(f"  adapter:  {summary['adapter']}  (PeftModel.from_pretrained(base, path) after `import molora`)")
    if summary.get("metrics"):
        lines.append(f"  metrics:  {summary['metrics']}")
    for p in summary.get("plots", []):
        lines.append(f"  plot:     {p}")
    lines.append(f"  results:  {Path(summary['output_dir']) / 'results.json'}")
    w = summary.get("wandb")
    if w:
        hint = " (upload with `wandb sync " + str(Path(w['dir']) / 'wandb' / 'offline-run-*') + "`)" \
            if w["mode"] == "offline" else ""
        lines.append(f"  wandb:    {w['mode']} run in {w['dir']}{hint}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
