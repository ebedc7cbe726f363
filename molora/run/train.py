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

Over 400 lines because :func:`run` is the ordered script of one run (recipe, data, model, trainer,
results); the Trainer subclass (:mod:`.trainer`) and the shared helpers (:mod:`.common`) live apart.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .common import (RunContext, RunError, SimulatedCrash, barrier, free_port, is_user_error,  # noqa: F401
                     load_base_model, load_recipe_rows, rank_info, timer, write_json_atomic)
from .recipe import Recipe, RecipeError, load_recipe, parse_overrides
from .trainer import build_trainer_class as _build_trainer_class  # a module global: tests patch it here

__all__ = ["main", "run", "parse_cli", "RunError"]

USAGE = """usage: molora train RECIPE.yaml [--section.key VALUE ...] [--resume latest|PATH] [--resume-allow KEYS]
                    [--validate]

  RECIPE.yaml           a recipe (see recipes/): model, data, allocation, train, eval, report
  --section.key VALUE   override a recipe value, e.g. --train.max_steps 20 --allocation.num_experts 2,4,6,8
  --deepspeed PATH      same as --train.deepspeed PATH (a DeepSpeed JSON config)
  --resume latest|PATH  continue from the newest complete checkpoint of train.output_dir, or from PATH
  --resume-allow KEYS   resume although these recipe keys or sections differ from the checkpoint's
                        (e.g. train.learning_rate,data; 'all' accepts every difference)
  --validate            check the recipe (and overrides), print it resolved, and exit
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
    if opts.recipe is None and not opts.help:
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


# ================================================================================================ environment


def _prepare_environment(recipe: Recipe) -> Optional[str]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time (local files, cache)
    if recipe.train.deepspeed and "RANK" not in os.environ:
        # DeepSpeed without its launcher: a world of one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    from .telemetry import configure_wandb

    return configure_wandb(recipe.report.wandb, recipe.report.wandb_mode, recipe.report.wandb_project,
                           recipe.train.output_dir)


def _patch_deepspeed_for_cpu() -> None:
    """On CPU, keep DeepSpeed from compiling its shared-memory collective op (``deepspeed_shm_comm``) on first use
    (minutes of C++ compilation); gloo's all-reduce is used instead. ``MOLORA_DS_SHM=1`` keeps the op."""
    import torch

    if torch.cuda.is_available() or os.environ.get("MOLORA_DS_SHM") == "1":
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed.comm.torch  # noqa: F401
    except Exception:  # noqa: BLE001 - deepspeed missing or broken: nothing to patch
        return
    mod = sys.modules.get("deepspeed.comm.torch")  # `deepspeed.comm.torch` as an attribute is the torch package
    if mod is not None and hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


# ================================================================================================ trainer


# ================================================================================================ run


def _previous_run_artifacts(out: Path) -> list[str]:
    """What in ``out`` shows that a run trained there: checkpoints, an adapter, results, or a metrics file with
    training records. Leftovers of a run that failed before its first step (a metrics.jsonl with only the run
    record, data/, plots/) do not count: the next run clears them."""
    from .checkpoint import list_checkpoints

    found = [p.name for p in list_checkpoints(out, complete_only=False)]
    for name in ("adapter", "results.json"):
        if (out / name).exists():
            found.append(name)
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        try:
            with open(metrics, encoding="utf-8", errors="replace") as fh:
                if any('"type": "train"' in line for line in fh):
                    found.append("metrics.jsonl")
        except OSError:
            found.append("metrics.jsonl")
    return found


def _clear_previous_run(out: Path) -> None:
    from .checkpoint import clean_staging, list_checkpoints

    for p in list_checkpoints(out, complete_only=False):
        shutil.rmtree(p, ignore_errors=True)
    for name in ("metrics.jsonl", "results.json", "predictions_before.json", "predictions_after.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("adapter", "plots"):
        shutil.rmtree(out / name, ignore_errors=True)
    clean_staging(out)


def _training_arguments(recipe: Recipe, report_to: list[str], ds_config: Optional[dict]):
    import dataclasses

    import torch
    from transformers import TrainingArguments

    t = recipe.train
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(t.extra) - names)
    if unknown:
        raise RecipeError(f"train.extra: {', '.join(unknown)} not TrainingArguments fields of this transformers version")
    kw: dict[str, Any] = dict(
        output_dir=t.output_dir, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm, lr_scheduler_type=t.lr_scheduler_type, optim=t.optim, bf16=t.bf16,
        fp16=t.fp16,
        eval_strategy=t.eval_strategy, eval_steps=t.eval_steps, save_strategy=t.save_strategy,
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, logging_steps=t.logging_steps,
        logging_first_step=t.logging_first_step, seed=t.seed, data_seed=t.data_seed,
        dataloader_num_workers=t.dataloader_num_workers, run_name=t.run_name, report_to=report_to,
        remove_unused_columns=False, label_names=["labels"], deepspeed=ds_config,
        use_cpu=not torch.cuda.is_available(),
    )
    ckpt_kwargs = {"use_reentrant": t.use_reentrant} if t.gradient_checkpointing else None
    if "activation_checkpointing" in names:  # transformers >= 5.2x renamed gradient_checkpointing
        kw.update(activation_checkpointing=t.gradient_checkpointing, activation_checkpointing_kwargs=ckpt_kwargs)
    else:
        kw.update(gradient_checkpointing=t.gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs)
    if "train_sampling_strategy" in names:
        kw["train_sampling_strategy"] = t.train_sampling_strategy
    elif t.train_sampling_strategy != "random":
        raise RecipeError("train.train_sampling_strategy needs transformers >= 5")
    if "warmup_ratio" in names:
        kw["warmup_ratio"] = t.warmup_ratio
    elif t.warmup_ratio and not t.warmup_steps:
        kw["warmup_steps"] = t.warmup_ratio  # transformers 5: a float < 1 is a ratio
    kw["warmup_steps"] = kw.get("warmup_steps", t.warmup_steps)
    kw.update(t.extra)
    return TrainingArguments(**{k: v for k, v in kw.items() if k in names})


def _accuracy(ctx: RunContext, model, tokenizer, rows, template, stage: str, all_ranks: bool) -> Optional[dict]:
    """Loglik and generation accuracy on the eval rows (rank 0, or every rank in lockstep under ZeRO-3)."""
    from .eval_run import recipe_accuracy

    e = ctx.recipe.eval
    if rows is None or not (e.loglik or e.generation):
        return None
    result: dict[str, Any] = {"stage": stage}
    if ctx.is_main or all_ranks:
        result.update(recipe_accuracy(model, tokenizer, rows, template, ctx.recipe, progress=ctx.is_main,
                                      predictions=e.save_predictions))
    if not all_ranks:
        barrier()
    preds = (result.get("loglik") or {}).pop("predictions", None)
    if ctx.is_main and preds is not None:
        write_json_atomic(Path(ctx.recipe.train.output_dir) / f"predictions_{stage}.json", {"stage": stage, "predictions": preds})
    if ctx.is_main:
        ctx.metrics.write({"type": "accuracy", **result})
        if ctx.use_wandb:
            _wandb_summary({f"accuracy_{stage}/{k}": v["accuracy"] for k, v in result.items() if isinstance(v, dict)})
        parts = []
        for kind in ("loglik", "generation"):
            if kind in result:
                norm = (f", accuracy_norm {result[kind]['accuracy_norm']:.3f}" if "accuracy_norm" in result[kind]
                        else "")
                parts.append(f"{kind} {result[kind]['accuracy']:.3f}{norm} (n={result[kind]['n']})")
        print(f"molora: accuracy {stage} training: " + ", ".join(parts), flush=True)
    return result if ctx.is_main else None


def _wandb_summary(values: dict[str, float], finish: bool = False) -> None:
    """Put values in the active wandb run's summary (the Trainer's callback started it); never raises."""
    try:
        import wandb

        if wandb.run is not None:
            for k, v in values.items():
                wandb.run.summary[k] = v
            if finish:
                wandb.finish()
    except Exception:  # noqa: BLE001 - telemetry must never fail a run
        pass


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
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    rank, _local_rank, world = rank_info()
    is_main = rank == 0
    out = Path(recipe.train.output_dir)
    wandb_mode = _prepare_environment(recipe)

    with timer(timings, "import_s"):
        import torch
        from peft import get_peft_model
        from transformers import TrainerCallback, set_seed

        import molora
        from molora_kernels import get_router

        from ..allocation.specs import router_names_of

        from . import checkpoint as ckpt_mod
        from . import resume as resume_mod
        from ..allocation import AllocationError, auto_method, is_auto
        from .allocate import resolve_recipe_auto
        from ..tuner.compat import enable_activation_checkpointing, peft_wrap
        from .data import DataCollator, PromptTemplate, build_dataset
        from .formats import detect_format
        from .host_memory import peak_resident_bytes, release_free_memory, resident_bytes
        from .label_logits import accepts_logits_to_keep
        from ..tuner.summary import _tuner
        from .telemetry import MetricsWriter, RouterTelemetry
    _patch_deepspeed_for_cpu()
    from .cpu_threads import configure_threads

    threads, threads_why = configure_threads(recipe.train.threads)

    # ---- allocation and resume target: fail before anything heavy
    try:
        mcfg = molora.MoLoRAConfig(**recipe.molora_config_kwargs())
    except AllocationError as e:
        raise RecipeError(f"allocation: {e}") from None
    ckpt = ckpt_mod.resolve_resume(resume, out)
    clear_leftovers = False
    if ckpt is None:
        previous = _previous_run_artifacts(out)
        if resume == "latest":
            if "results.json" in previous or "adapter" in previous:
                raise RunError(f"--resume latest: {out} holds a run that finished or saved its adapter but has no "
                               f"complete checkpoint to resume; pass --train.overwrite_output_dir true to train again "
                               f"(deletes it), or choose another output_dir")
            if is_main:
                why = (f" (the run there stopped before its first checkpoint: {', '.join(previous[:4])})"
                       if previous else "")
                print(f"molora: --resume latest: no complete checkpoint in {out}{why}; starting from scratch",
                      flush=True)
            clear_leftovers = True
        elif previous and not recipe.train.overwrite_output_dir:
            raise RunError(f"train.output_dir {out} holds a previous run ({', '.join(previous[:4])}); pass --resume "
                           f"latest to continue it, --train.overwrite_output_dir true to start over (deletes its "
                           f"checkpoints, metrics and adapter), or choose another output_dir")
        else:
            clear_leftovers = True  # leftovers of a run that never trained (metrics.jsonl, plots): cleared
    elif resume_allow and is_main:
        print(f"molora: --resume-allow {resume_allow}", flush=True)

    ds_config = None
    zero_stage = 0
    if recipe.train.deepspeed:
        ds_config = json.loads(Path(recipe.train.deepspeed).read_text(encoding="utf-8"))
        zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0) or 0)
        if recipe.train.nonfinite == "skip":
            raise RunError("train.nonfinite: skip is not available under DeepSpeed (its engine applies the step inside "
                           "backward, before the step can be dropped; its fp16 loss scaler skips overflow steps "
                           "itself); use train.nonfinite: error")
        if recipe.train.router_lr_multiplier != 1.0 and "optimizer" in ds_config:
            raise RunError(f"train.router_lr_multiplier={recipe.train.router_lr_multiplier:g} needs the Trainer's "
                           f"optimizer (its parameter groups), but {recipe.train.deepspeed} defines an \"optimizer\" "
                           f"DeepSpeed builds itself; drop that section (the Trainer then passes its AdamW) or the "
                           f"multiplier")
    report_to = ["wandb"] if wandb_mode else []
    precision = _precision(recipe, torch.cuda.is_available())
    setup = resume_mod.setup_of(ds_config is not None, zero_stage, world)
    marker = ckpt_mod.read_marker(ckpt) if ckpt is not None else None
    if ckpt is not None:
        resume_mod.check_setup(ckpt, resume_mod.checkpoint_setup(ckpt, marker or {}), setup)
    done_step = resume_mod.training_finished(ckpt, recipe.train.max_steps) if ckpt is not None else None
    if done_step is not None and _finished_run_complete(out, done_step):
        if is_main:
            print(f"molora: the run in {out} is complete (step {done_step}: adapter and results.json written); "
                  f"nothing to do. Use --train.overwrite_output_dir true to train again.", flush=True)
        return json.loads((out / "results.json").read_text(encoding="utf-8"))

    # ---- distributed setup happens here (TrainingArguments); ZeRO-3 then loads the model partitioned
    if ds_config is not None and not torch.cuda.is_available():
        # On CPU the Trainer sets up plain torch.distributed (gloo) and DeepSpeed's own comm layer stays
        # uninitialised, so zero.Init (ZeRO-3 model loading) would see a world of one. Initialise it first.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    args = _training_arguments(recipe, report_to, ds_config)
    _ = args.device  # sets up torch.distributed (DeepSpeed: deepspeed.init_distributed) now, on every rank
    rank, world = args.process_index, args.world_size
    is_main = args.should_save
    if ckpt is None and is_main:
        if recipe.train.overwrite_output_dir or clear_leftovers:
            _clear_previous_run(out)
        ckpt_mod.clean_staging(out)
    if ckpt is not None and is_main:
        ckpt_mod.clean_staging(out)
    barrier()
    out.mkdir(parents=True, exist_ok=True)

    metrics = MetricsWriter(out / "metrics.jsonl", enabled=is_main and recipe.report.jsonl)
    with timer(timings, "data_s"):
        train_rows, eval_rows, data_paths = load_recipe_rows(recipe, out, is_main)
    fingerprint = resume_mod.fingerprint(recipe.to_dict(), train_rows, world)
    if ckpt is not None:
        if marker is not None and marker.get("fingerprint") is None and is_main:
            print(f"molora: {ckpt} records no fingerprint (written by an older molora): the recipe and data "
                  f"cannot be compared with it", flush=True)
        accepted = resume_mod.check_fingerprint(ckpt, (marker or {}).get("fingerprint"), fingerprint,
                                                resume_mod.parse_allow(resume_allow))
        if accepted and is_main:
            print("molora: resuming with changes allowed by --resume-allow:\n  " + "\n  ".join(accepted), flush=True)

    with timer(timings, "model_load_s"):
        base, tokenizer = load_base_model(recipe)
    if recipe.model.quantization is not None:
        # QLoRA semantics (PEFT): freeze the base, cast its non-quantized half-precision parameters (norms,
        # embeddings, lm_head) to float32; activation checkpointing is set up below, as for any base
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        if is_main:
            print(f"molora: base model loaded in {recipe.model.quantization} (bitsandbytes): "
                  f"{base.get_memory_footprint() / 2**20:.0f} MiB of weights", flush=True)
    if recipe.train.gradient_checkpointing:
        base.config.use_cache = False
        enable_activation_checkpointing(base, recipe.train.use_reentrant)
    if recipe.train.gradient_checkpointing or zero_stage == 3:
        # reentrant checkpointing needs inputs that require grad to reach the adapters; ZeRO-3 leaf modules need
        # it too: without it the first block's input needs no grad, DeepSpeed's post-backward bookkeeping of
        # the leaf goes wrong and backward fails on a released (size-0) parameter
        base.enable_input_require_grads()
    auto = None
    if is_auto(recipe.allocation.num_experts):
        if zero_stage == 3:
            raise RunError(f"allocation.num_experts={recipe.allocation.num_experts!r} is computed on the whole "
                           f"model, which ZeRO-3 partitions: run `molora allocate {recipe.source or 'RECIPE'} "
                           f"--method {auto_method(recipe.allocation.num_experts)} --budget "
                           f"{recipe.allocation.expert_budget} --write alloc.yaml` first and use its num_experts list")
        with timer(timings, "auto_allocation_s"):
            auto = resolve_recipe_auto(recipe, base, tokenizer, train_rows, is_main=is_main,
                                       log=lambda m: print(m, flush=True))
        mcfg = molora.MoLoRAConfig(**{**recipe.molora_config_kwargs(), "num_experts": auto["num_experts"],
                                      "num_experts_mlp": auto.get("num_experts_mlp"), "expert_budget": None})
    set_seed(recipe.train.seed)  # the adapter's initialisation is part of the run (same on every rank)
    model = peft_wrap(lambda: get_peft_model(base, mcfg), base)
    cfg = model.peft_config[model.active_adapter]
    if zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [molora.MoLoRALinear])
    if ckpt is not None:
        ckpt_mod.check_allocation(ckpt, model)

    template = PromptTemplate(recipe.data.prompt_template)
    d = recipe.data
    train_ds = build_dataset(train_rows, tokenizer, template, d.cutoff_len, d.train_on_inputs)
    cut_note = train_ds.truncation.message("training rows")
    if cut_note and is_main:
        print(f"molora: warning: {cut_note}", flush=True)
    eval_ds = None
    if recipe.train.eval_strategy != "no":
        if eval_rows is None:
            raise RunError("train.eval_strategy needs evaluation data: set data.eval_file (or use a packaged data set)")
        eval_ds = build_dataset(eval_rows, tokenizer, template, d.cutoff_len, d.train_on_inputs,
                                max_examples=d.max_eval_examples)
    eval_fmt = detect_format(eval_rows[0]) if eval_rows else None
    acc_rows = eval_rows if (eval_fmt is not None and eval_fmt.has_options) else None
    if eval_rows and acc_rows is None and is_main:
        print(f"molora: evaluation data is in the {eval_fmt.name if eval_fmt else 'unknown'} format, which has no "
              f"answer options to score; accuracy is not measured (eval_loss only)")
    elif not eval_rows and is_main and (recipe.eval.before or recipe.eval.after) and \
            (recipe.eval.loglik or recipe.eval.generation):
        print("molora: no evaluation rows (data.eval_file, or a packaged data set's validation split), so the "
              "accuracy before/after training asked for by eval.before/eval.after is not measured; set "
              "data.eval_file to a choices-format file, or eval.before/after: false to silence this", flush=True)

    routers = [get_router(n) for n in router_names_of(cfg.router)]
    coef = float(cfg.aux_loss_coef) if any(r.aux_loss is not None for r in routers) else 0.0
    from .cpu_threads import SlowStepWatch

    ctx = RunContext(recipe=recipe, is_main=is_main, zero3=zero_stage == 3, aux_loss_coef=coef,
                     slow_watch=None if torch.cuda.is_available() else SlowStepWatch(threads),
                     allocation=cfg.allocation, metrics=metrics, use_wandb=bool(wandb_mode),
                     setup=setup, fingerprint=fingerprint,
                     logits_at_labels_only=recipe.train.logits_at_labels_only and accepts_logits_to_keep(model),
                     tuner=_tuner(model))

    table = molora.allocation_table(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.get_nb_trainable_parameters()[1]  # PEFT's count: a 4-bit parameter packs two weights per byte
    from .storage import check_free_space, checkpoint_bytes

    ctx.checkpoint_bytes = checkpoint_bytes(trainable)
    if is_main:  # room for one checkpoint and the final adapter, before the first step
        check_free_space(out, ctx.checkpoint_bytes + trainable * 4, "a checkpoint and the final adapter")
    if is_main:
        n_layers = len({row.layer for row in table})
        split = any(row.kind for row in table)
        experts = (f"{sum(r.num_experts for r in table if r.kind == 'attn')} attention + "
                   f"{sum(r.num_experts for r in table if r.kind == 'mlp')} MLP experts" if split
                   else f"{table.total_experts} experts")
        print(f"molora: {recipe.model.name_or_path}: {n_layers} layers, {experts}, "
              f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)", flush=True)
        print(str(table), flush=True)
        print(f"molora: precision: {precision}", flush=True)
        if not torch.cuda.is_available():
            print(f"molora: CPU threads: {threads} ({threads_why}; set train.threads or OMP_NUM_THREADS to change)",
                  flush=True)
        metrics.write({"type": "run", "recipe": recipe.to_dict(), "allocation": cfg.allocation,
                       "precision": precision, "auto_allocation": auto,
                       "num_layers": cfg.num_layers, "trainable_params": trainable, "total_params": total,
                       "world_size": world, "zero_stage": zero_stage, "train_examples": len(train_ds),
                       "truncation": train_ds.truncation.as_dict(),
                       "resumed_from": str(ckpt) if ckpt else None,
                       "resume_step": _checkpoint_step(ckpt) if ckpt else None, "data": data_paths})

    if recipe.report.router_telemetry:
        ctx.telemetry = RouterTelemetry(model)  # per layer: top-k loads, or the gate mass of soft routers

    results: dict[str, Any] = {}
    all_ranks_eval = zero_stage == 3

    class _BeforeEval(TrainerCallback):
        def on_train_begin(self, args_, state, control, model=None, **kw):
            if ckpt is None and recipe.eval.before:
                with timer(timings, "eval_before_s"):
                    results["before"] = _accuracy(ctx, model if model is not None else trainer.model, tokenizer,
                                                  acc_rows, template, "before", all_ranks_eval)

    class _ReleaseHostMemory(TrainerCallback):
        """Steps of varying length fragment glibc's heap and RSS grows without bound (see host_memory)."""

        def on_step_end(self, args_, state, control, **kw):
            ctx.rss_interval_max = max(ctx.rss_interval_max, resident_bytes() or 0)  # before the trim: honest
            release_free_memory()

    class _NonFiniteGuard(TrainerCallback):
        """Gradients before the optimizer step, weights after it (see molora.run.nonfinite)."""

        def on_pre_optimizer_step(self, args_, state, control, **kw):
            trainer._pre_optimizer_step()

        def on_step_end(self, args_, state, control, **kw):
            trainer._post_step()

    Trainer = _build_trainer_class()
    collator = DataCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                      processing_class=tokenizer, callbacks=[_BeforeEval(), _ReleaseHostMemory(), _NonFiniteGuard()],
                      molora=ctx)
    if is_main:
        where = f"resuming from {ckpt}" if ckpt else "from scratch"
        print(f"molora: training {where}: {len(train_ds)} examples, world size {world}"
              f"{f', ZeRO-{zero_stage}' if ds_config else ''}; output in {out}", flush=True)
    if done_step is None:
        from .safe_load import weights_only_loads

        # a resume unpickles weights only (DeepSpeed's own loads would run any code a shard carries)
        with timer(timings, "train_s"), (weights_only_loads() if ckpt else contextlib.nullcontext()):
            train_out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        global_step, train_loss = trainer.state.global_step, train_out.training_loss
    else:
        # Training ended at this checkpoint (a run killed during its final save, evaluation or plots): finish
        # only the work after training, with the checkpoint's weights; never another optimizer step.
        if is_main:
            print(f"molora: {ckpt.name} is the end of training (step {done_step}); finishing what came after it: "
                  f"final adapter, evaluation, results and plots", flush=True)
        ckpt_mod.load_adapter_weights(trainer.model, ckpt, zero3=ctx.zero3)
        global_step, train_loss = done_step, _last_train_loss(ckpt)
    if ctx.telemetry is not None:
        ctx.telemetry.close()

    # ---- final adapter (atomic), accuracy after, results, plots
    adapter_dir = out / "adapter"
    tmp = ckpt_mod.staging_dir(out, "adapter")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    from .storage import disk_full_guard

    with disk_full_guard(tmp, trainable * 4 + (1 << 20), "the final adapter"):
        ckpt_mod.save_adapter(trainer.model, tmp, is_main=is_main, zero3=ctx.zero3)
    if is_main:
        tokenizer.save_pretrained(str(tmp))
        ckpt_mod.write_marker(tmp, {"step": global_step, "allocation": cfg.allocation,
                                    "base_model": recipe.model.name_or_path, "fingerprint": fingerprint})
        ckpt_mod.commit_dir(tmp, adapter_dir)
    barrier()
    if recipe.eval.after:
        with timer(timings, "eval_after_s"):
            results["after"] = _accuracy(ctx, trainer.model, tokenizer, acc_rows, template, "after", all_ranks_eval)

    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    summary: dict[str, Any] = {"output_dir": str(out), "adapter": str(adapter_dir),
                               "metrics": str(out / "metrics.jsonl") if recipe.report.jsonl else None,
                               "global_step": global_step, "train_loss": train_loss,
                               "timings": timings, "accuracy": {}, "plots": [], "world_size": world,
                               "nonfinite_skipped_steps": trainer.nonfinite_skipped,
                               "host_peak_rss_gib": round((peak_resident_bytes() or 0) / 2**30, 2)}
    if is_main:
        before = results.get("before") or _previous_accuracy(out / "metrics.jsonl", "before")
        for stage, res in (("before", before), ("after", results.get("after"))):
            if res:
                summary["accuracy"][stage] = {k: {kk: v[kk] for kk in ("accuracy", "accuracy_norm", "n") if kk in v}
                                              for k, v in res.items() if isinstance(v, dict)}
        if wandb_mode:
            summary["wandb"] = {"mode": wandb_mode, "dir": os.environ.get("WANDB_DIR")}
        metrics.write({"type": "summary", **summary})
        metrics.close()
        if recipe.report.plots and recipe.report.jsonl:
            try:
                from .report import render

                summary["plots"] = [str(p) for p in render(out)]
            except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
                print(f"molora: could not render plots: {e}", flush=True)
        write_json_atomic(out / "results.json", summary)
        if wandb_mode:
            _wandb_summary({"train/global_step": summary["global_step"]}, finish=True)
        _print_summary(summary, recipe)
    else:
        metrics.close()
    barrier()
    return summary


def _precision(recipe: Recipe, cuda: bool) -> str:
    """What precision the run computes in, in words; refuses what would silently run otherwise (fp16 on CPU)."""
    t = recipe.train
    m = recipe.model
    base = (f"{m.bnb_4bit_quant_type} 4-bit (compute {m.bnb_4bit_compute_dtype or m.dtype})" if m.load_in_4bit
            else "int8 (LLM.int8)" if m.load_in_8bit else m.dtype)
    weights = f"base weights {base}, adapter weights {'float64' if m.dtype == 'float64' else 'float32'}"
    if m.dtype == "float64":  # an equivalence check's reference: exact arithmetic, or refused
        why = ("DeepSpeed casts the model to float32 (or 16 bits) without saying so" if t.deepspeed
               else "autocast would compute in 16 bits" if (t.bf16 or t.fp16)
               else "quantized layers compute in 16 or 32 bits" if m.quantization else None)
        if why:
            raise RunError(f"model.dtype: float64 is a single-process, unquantized, no-autocast setting (for "
                           f"equivalence checks): {why}. Use model.dtype: float32")
    if t.fp16 and not cuda:
        raise RunError("train.fp16: true needs a CUDA GPU (fp16 autocast with loss scaling); on this machine the "
                       "Trainer would silently train in float32. Use train.bf16: true (bfloat16 autocast, which runs "
                       "on CPU) or neither (float32)")
    if t.bf16:
        return f"bfloat16 autocast ({'CUDA' if cuda else 'CPU'}), {weights}"
    if t.fp16:
        return f"float16 autocast with loss scaling (CUDA), {weights}"
    return f"{recipe.model.dtype} (no autocast), {weights}"


def _finished_run_complete(out: Path, step: int) -> bool:
    """True when ``out`` holds the final adapter of ``step`` (complete marker) and its results.json."""
    from .checkpoint import is_complete, read_marker

    adapter = out / "adapter"
    if not (is_complete(adapter) and (out / "results.json").is_file()):
        return False
    marker = read_marker(adapter) or {}
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("step") == step and results.get("global_step") == step


def _last_train_loss(ckpt: Path) -> Optional[float]:
    """The mean training loss the Trainer logged last in a checkpoint's state (None if none was logged)."""
    try:
        history = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError):
        return None
    for rec in reversed(history):
        for key in ("train_loss", "loss"):
            if key in rec:
                return float(rec[key])
    return None


def _checkpoint_step(path: Optional[Path]) -> Optional[int]:
    if path is None:
        return None
    try:
        return int(Path(path).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _previous_accuracy(metrics: Path, stage: str) -> Optional[dict]:
    """The accuracy a run measured before it was interrupted (a resumed run does not measure it again)."""
    from .telemetry import read_metrics

    try:
        found = [r for r in read_metrics(metrics) if r.get("type") == "accuracy" and r.get("stage") == stage]
    except OSError:
        return None
    return found[-1] if found else None


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
