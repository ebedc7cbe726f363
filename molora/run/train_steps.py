"""The named steps of one ``molora train`` run, in order (torchtune-style): each reads what earlier steps left
in the :class:`TrainRun` and adds its own, so each can be read, tested and changed alone.

    start -> build_config -> resume_target -> deepspeed_config -> check_resume_setup -> distributed_setup
          -> load_data -> build_model -> build_datasets -> run_context -> make_trainer -> train
          -> save_final_adapter -> finish

:func:`molora.run.train.run` calls them (under the output folder's lock); see :mod:`molora.run.train` for what a
run does and why the Trainer is subclassed. Over 400 lines because it holds every step of a run and the helpers
only they use (training arguments, accuracy, precision, what a previous run left).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .common import RunContext, RunError, barrier, load_base_model, load_recipe_rows, rank_info, timer, write_json_atomic
from .recipe import Recipe, RecipeError
from .train_support import (accuracy, checkpoint_step, clear_previous_run, finished_run_complete, last_train_loss,
                            patch_deepspeed_for_cpu, precision, prepare_environment, previous_accuracy,
                            previous_run_artifacts, training_arguments, wandb_summary)


# ================================================================================================ the run's state


@dataclass
class TrainRun:
    """What the steps of one ``molora train`` run hand each other, filled in order by the steps below (each step
    reads what earlier steps set and sets its own fields)."""

    recipe: Recipe
    resume: Optional[str] = None
    resume_allow: Optional[str] = None
    t_start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    out: Path = Path(".")
    rank: int = 0
    world: int = 1
    is_main: bool = True
    wandb_mode: Optional[str] = None
    threads: int = 1
    threads_why: str = ""
    mcfg: Any = None                       # the MoLoRAConfig (auto: allocations replace it after scoring)
    ckpt: Optional[Path] = None            # the checkpoint resumed from
    clear_leftovers: bool = False
    ds_config: Optional[dict] = None
    zero_stage: int = 0
    precision: str = ""
    setup: Any = None
    marker: Optional[dict] = None
    done_step: Optional[int] = None        # the checkpoint ends training: only the work after it is left
    args: Any = None                       # TrainingArguments
    metrics: Any = None                    # MetricsWriter
    train_rows: Any = None
    eval_rows: Any = None
    data_paths: Any = None
    fingerprint: Any = None
    tokenizer: Any = None
    auto: Optional[dict] = None
    model: Any = None
    cfg: Any = None                        # the injected adapter's config
    template: Any = None
    train_ds: Any = None
    eval_ds: Any = None
    acc_rows: Any = None                   # rows scored before/after training (None: the data has no options)
    ctx: Optional[RunContext] = None
    trainable: int = 0
    trainer: Any = None
    results: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0
    train_loss: Optional[float] = None

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)


# ================================================================================================ steps


def start(run: TrainRun) -> None:
    """Environment, rank, heavy imports (timed), CPU threads."""
    run.rank, _local_rank, run.world = rank_info()
    run.is_main = run.rank == 0
    run.out = Path(run.recipe.train.output_dir)
    run.wandb_mode = prepare_environment(run.recipe)
    with timer(run.timings, "import_s"):
        import peft  # noqa: F401  (the heavy imports of a run, timed)
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import molora  # noqa: F401
    patch_deepspeed_for_cpu()
    from .cpu_threads import configure_threads

    run.threads, run.threads_why = configure_threads(run.recipe.train.threads)


def build_config(run: TrainRun) -> None:
    """The MoLoRA config (allocation errors surface here, before anything heavy)."""
    import molora
    from ..allocation import AllocationError

    try:
        run.mcfg = molora.MoLoRAConfig(**run.recipe.molora_config_kwargs())
    except AllocationError as e:
        raise RecipeError(f"allocation: {e}") from None


def resume_target(run: TrainRun) -> None:
    """The checkpoint to resume from (``--resume``), or whether ``output_dir``'s leftovers may be cleared."""
    from . import checkpoint as ckpt_mod

    recipe, out, resume = run.recipe, run.out, run.resume
    run.ckpt = ckpt_mod.resolve_resume(resume, out)
    if run.ckpt is not None:
        if run.resume_allow:
            run.say(f"molora: --resume-allow {run.resume_allow}")
        return
    previous = previous_run_artifacts(out)
    if resume == "latest":
        if "results.json" in previous or "adapter" in previous:
            raise RunError(f"--resume latest: {out} holds a run that finished or saved its adapter but has no "
                           f"complete checkpoint to resume; pass --train.overwrite_output_dir true to train again "
                           f"(deletes it), or choose another output_dir")
        why = (f" (the run there stopped before its first checkpoint: {', '.join(previous[:4])})"
               if previous else "")
        run.say(f"molora: --resume latest: no complete checkpoint in {out}{why}; starting from scratch")
        run.clear_leftovers = True
    elif previous and not recipe.train.overwrite_output_dir:
        raise RunError(f"train.output_dir {out} holds a previous run ({', '.join(previous[:4])}); pass --resume "
                       f"latest to continue it, --train.overwrite_output_dir true to start over (deletes its "
                       f"checkpoints, metrics and adapter), or choose another output_dir")
    else:
        run.clear_leftovers = True  # leftovers of a run that never trained (metrics.jsonl, plots): cleared


def deepspeed_config(run: TrainRun) -> None:
    """Read ``train.deepspeed`` and refuse the settings it cannot honour."""
    recipe = run.recipe
    if not recipe.train.deepspeed:
        return
    run.ds_config = json.loads(Path(recipe.train.deepspeed).read_text(encoding="utf-8"))
    run.zero_stage = int(run.ds_config.get("zero_optimization", {}).get("stage", 0) or 0)
    if recipe.train.nonfinite == "skip":
        raise RunError("train.nonfinite: skip is not available under DeepSpeed (its engine applies the step inside "
                       "backward, before the step can be dropped; its fp16 loss scaler skips overflow steps "
                       "itself); use train.nonfinite: error")
    if run.zero_stage == 3:
        from ..allocation.expert_inits import get_expert_init

        if get_expert_init(recipe.allocation.expert_init).reads_base_weight:
            raise RunError(f"allocation.expert_init={recipe.allocation.expert_init!r} reads each base weight when the "
                           f"adapter is created, but {recipe.train.deepspeed} is ZeRO stage 3, which loads the model "
                           f"partitioned; use expert_init orthogonal or kaiming, or ZeRO stage 2")
    if recipe.train.router_lr_multiplier != 1.0 and "optimizer" in run.ds_config:
        raise RunError(f"train.router_lr_multiplier={recipe.train.router_lr_multiplier:g} needs the Trainer's "
                       f"optimizer (its parameter groups), but {recipe.train.deepspeed} defines an \"optimizer\" "
                       f"DeepSpeed builds itself; drop that section (the Trainer then passes its AdamW) or the "
                       f"multiplier")


def check_resume_setup(run: TrainRun) -> Optional[dict]:
    """Precision, and the resumed checkpoint's setup against this one. Returns the finished run's results when
    there is nothing left to do (the run completed), else None."""
    import torch

    from . import checkpoint as ckpt_mod
    from . import resume as resume_mod

    run.precision = precision(run.recipe, torch.cuda.is_available())
    run.setup = resume_mod.setup_of(run.ds_config is not None, run.zero_stage, run.world)
    if run.ckpt is None:
        return None
    run.marker = ckpt_mod.read_marker(run.ckpt)
    resume_mod.check_setup(run.ckpt, resume_mod.checkpoint_setup(run.ckpt, run.marker or {}), run.setup)
    run.done_step = resume_mod.training_finished(run.ckpt, run.recipe.train.max_steps)
    if run.done_step is not None and finished_run_complete(run.out, run.done_step):
        run.say(f"molora: the run in {run.out} is complete (step {run.done_step}: adapter and results.json written); "
                f"nothing to do. Use --train.overwrite_output_dir true to train again.")
        return json.loads((run.out / "results.json").read_text(encoding="utf-8"))
    return None


def distributed_setup(run: TrainRun) -> None:
    """TrainingArguments (which set up torch.distributed / DeepSpeed on every rank; ZeRO-3 then loads the model
    partitioned), then a clean output folder."""
    import torch

    from . import checkpoint as ckpt_mod

    if run.ds_config is not None and not torch.cuda.is_available():
        # On CPU the Trainer sets up plain torch.distributed (gloo) and DeepSpeed's own comm layer stays
        # uninitialised, so zero.Init (ZeRO-3 model loading) would see a world of one. Initialise it first.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    run.args = training_arguments(run.recipe, ["wandb"] if run.wandb_mode else [], run.ds_config)
    _ = run.args.device  # sets up torch.distributed (DeepSpeed: deepspeed.init_distributed) now, on every rank
    run.rank, run.world = run.args.process_index, run.args.world_size
    run.is_main = run.args.should_save
    if run.is_main:
        if run.ckpt is None and (run.recipe.train.overwrite_output_dir or run.clear_leftovers):
            clear_previous_run(run.out)
        ckpt_mod.clean_staging(run.out)
    barrier()
    run.out.mkdir(parents=True, exist_ok=True)


def load_data(run: TrainRun) -> None:
    """Rows (a packaged data set is written to ``output_dir/data``), the run's fingerprint and, when resuming, its
    check against the checkpoint's."""
    from . import resume as resume_mod
    from .telemetry import MetricsWriter

    recipe = run.recipe
    run.metrics = MetricsWriter(run.out / "metrics.jsonl", enabled=run.is_main and recipe.report.jsonl)
    with timer(run.timings, "data_s"):
        run.train_rows, run.eval_rows, run.data_paths = load_recipe_rows(recipe, run.out, run.is_main)
    run.fingerprint = resume_mod.fingerprint(recipe.to_dict(), run.train_rows, run.world)
    if run.ckpt is None:
        return
    if run.marker is not None and run.marker.get("fingerprint") is None:
        run.say(f"molora: {run.ckpt} records no fingerprint (written by an older molora): the recipe and data cannot "
                f"be compared with it")
    accepted = resume_mod.check_fingerprint(run.ckpt, (run.marker or {}).get("fingerprint"), run.fingerprint,
                                            resume_mod.parse_allow(run.resume_allow))
    if accepted:
        run.say("molora: resuming with changes allowed by --resume-allow:\n  " + "\n  ".join(accepted))


def build_model(run: TrainRun) -> None:
    """Base model (quantized / checkpointed as the recipe says), a data-driven allocation when asked, the adapter."""
    from peft import get_peft_model
    from transformers import set_seed

    import molora

    from ..allocation import auto_method, is_auto
    from ..tuner.compat import enable_activation_checkpointing, peft_wrap
    from . import checkpoint as ckpt_mod
    from .allocate import resolve_recipe_auto

    recipe = run.recipe
    with timer(run.timings, "model_load_s"):
        base, run.tokenizer = load_base_model(recipe)
    if recipe.model.quantization is not None:
        # QLoRA semantics (PEFT): freeze the base, cast its non-quantized half-precision parameters (norms,
        # embeddings, lm_head) to float32; activation checkpointing is set up below, as for any base
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        run.say(f"molora: base model loaded in {recipe.model.quantization} (bitsandbytes): "
                f"{base.get_memory_footprint() / 2**20:.0f} MiB of weights")
    if recipe.train.gradient_checkpointing:
        base.config.use_cache = False
        enable_activation_checkpointing(base, recipe.train.use_reentrant)
    if recipe.train.gradient_checkpointing or run.zero_stage == 3:
        # reentrant checkpointing needs inputs that require grad to reach the adapters; ZeRO-3 leaf modules need
        # it too: without it the first block's input needs no grad, DeepSpeed's post-backward bookkeeping of
        # the leaf goes wrong and backward fails on a released (size-0) parameter
        base.enable_input_require_grads()
    if is_auto(recipe.allocation.num_experts):
        if run.zero_stage == 3:
            raise RunError(f"allocation.num_experts={recipe.allocation.num_experts!r} is computed on the whole "
                           f"model, which ZeRO-3 partitions: run `molora allocate {recipe.source or 'RECIPE'} "
                           f"--method {auto_method(recipe.allocation.num_experts)} --budget "
                           f"{recipe.allocation.expert_budget} --write alloc.yaml` first and use its num_experts list")
        with timer(run.timings, "auto_allocation_s"):
            run.auto = resolve_recipe_auto(recipe, base, run.tokenizer, run.train_rows, is_main=run.is_main,
                                           log=lambda m: print(m, flush=True))
        run.mcfg = molora.MoLoRAConfig(**{**recipe.molora_config_kwargs(), "num_experts": run.auto["num_experts"],
                                          "num_experts_mlp": run.auto.get("num_experts_mlp"), "expert_budget": None})
    set_seed(recipe.train.seed)  # the adapter's initialisation is part of the run (same on every rank)
    run.model = peft_wrap(lambda: get_peft_model(base, run.mcfg), base)
    run.cfg = run.model.peft_config[run.model.active_adapter]
    if run.zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(run.model, [molora.MoLoRALinear])
    if run.ckpt is not None:
        ckpt_mod.check_allocation(run.ckpt, run.model)


def build_datasets(run: TrainRun) -> None:
    """Tokenised training (and evaluation-loss) sets, and the rows scored for accuracy."""
    from .data import PromptTemplate, build_dataset
    from .formats import detect_format

    recipe, d = run.recipe, run.recipe.data
    run.template = PromptTemplate(d.prompt_template)
    run.train_ds = build_dataset(run.train_rows, run.tokenizer, run.template, d.cutoff_len, d.train_on_inputs)
    cut_note = run.train_ds.truncation.message("training rows")
    if cut_note:
        run.say(f"molora: warning: {cut_note}")
    if recipe.train.eval_strategy != "no":
        if run.eval_rows is None:
            raise RunError("train.eval_strategy needs evaluation data: set data.eval_file (or use a packaged data set)")
        run.eval_ds = build_dataset(run.eval_rows, run.tokenizer, run.template, d.cutoff_len, d.train_on_inputs,
                                    max_examples=d.max_eval_examples)
    eval_fmt = detect_format(run.eval_rows[0]) if run.eval_rows else None
    run.acc_rows = run.eval_rows if (eval_fmt is not None and eval_fmt.has_options) else None
    if run.eval_rows and run.acc_rows is None:
        run.say(f"molora: evaluation data is in the {eval_fmt.name if eval_fmt else 'unknown'} format, which has no "
                f"answer options to score; accuracy is not measured (eval_loss only)")
    elif not run.eval_rows and (recipe.eval.before or recipe.eval.after) and \
            (recipe.eval.loglik or recipe.eval.generation):
        run.say("molora: no evaluation rows (data.eval_file, or a packaged data set's validation split), so the "
                "accuracy before/after training asked for by eval.before/eval.after is not measured; set "
                "data.eval_file to a choices-format file, or eval.before/after: false to silence this")


def run_context(run: TrainRun) -> None:
    """The run context the Trainer reads (aux-loss weight, telemetry, ...), a disk-space check, and the run's
    announcement: allocation table, precision, threads, and the ``run`` record of metrics.jsonl."""
    import torch

    import molora
    from molora_kernels import get_router

    from ..allocation.specs import router_names_of
    from ..tuner.summary import _tuner
    from .cpu_threads import SlowStepWatch
    from .label_logits import accepts_logits_to_keep
    from .storage import check_free_space, checkpoint_bytes
    from .telemetry import RouterTelemetry

    recipe, model, cfg = run.recipe, run.model, run.cfg
    routers = [get_router(n) for n in router_names_of(cfg.router)]
    coef = float(cfg.aux_loss_coef) if any(r.aux_loss is not None for r in routers) else 0.0
    run.ctx = ctx = RunContext(
        recipe=recipe, is_main=run.is_main, zero3=run.zero_stage == 3, aux_loss_coef=coef,
        slow_watch=None if torch.cuda.is_available() else SlowStepWatch(run.threads),
        allocation=cfg.allocation, metrics=run.metrics, use_wandb=bool(run.wandb_mode), setup=run.setup,
        fingerprint=run.fingerprint,
        logits_at_labels_only=recipe.train.logits_at_labels_only and accepts_logits_to_keep(model),
        tuner=_tuner(model))
    table = molora.allocation_table(model)
    run.trainable = trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = model.get_nb_trainable_parameters()[1]  # PEFT's count: a 4-bit parameter packs two weights per byte
    ctx.checkpoint_bytes = checkpoint_bytes(trainable)
    if run.is_main:  # room for one checkpoint and the final adapter, before the first step
        check_free_space(run.out, ctx.checkpoint_bytes + trainable * 4, "a checkpoint and the final adapter")
        n_layers = len({row.layer for row in table})
        split = any(row.kind for row in table)
        experts = (f"{sum(r.num_experts for r in table if r.kind == 'attn')} attention + "
                   f"{sum(r.num_experts for r in table if r.kind == 'mlp')} MLP experts" if split
                   else f"{table.total_experts} experts")
        run.say(f"molora: {recipe.model.name_or_path}: {n_layers} layers, {experts}, "
                f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
        run.say(str(table))
        run.say(f"molora: precision: {run.precision}")
        if not torch.cuda.is_available():
            run.say(f"molora: CPU threads: {run.threads} ({run.threads_why}; set train.threads or OMP_NUM_THREADS to "
                    f"change)")
        run.metrics.write({"type": "run", "recipe": recipe.to_dict(), "allocation": cfg.allocation,
                           "precision": run.precision, "auto_allocation": run.auto,
                           "num_layers": cfg.num_layers, "trainable_params": trainable, "total_params": total,
                           "world_size": run.world, "zero_stage": run.zero_stage,
                           "train_examples": len(run.train_ds), "truncation": run.train_ds.truncation.as_dict(),
                           "resumed_from": str(run.ckpt) if run.ckpt else None,
                           "resume_step": checkpoint_step(run.ckpt) if run.ckpt else None, "data": run.data_paths})
    if recipe.report.router_telemetry:
        ctx.telemetry = RouterTelemetry(model)  # per layer: top-k loads, or the gate mass of soft routers


def make_trainer(run: TrainRun, trainer_class: type) -> None:
    """The Trainer with molora's callbacks: accuracy before training, host-memory release, the non-finite guard."""
    from transformers import TrainerCallback

    from .data import DataCollator
    from .host_memory import release_free_memory, resident_bytes

    ctx, recipe = run.ctx, run.recipe
    all_ranks_eval = run.zero_stage == 3

    class _BeforeEval(TrainerCallback):
        def on_train_begin(self, args_, state, control, model=None, **kw):
            if run.ckpt is None and recipe.eval.before:
                with timer(run.timings, "eval_before_s"):
                    run.results["before"] = accuracy(ctx, model if model is not None else trainer.model,
                                                     run.tokenizer, run.acc_rows, run.template, "before",
                                                     all_ranks_eval)

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

    collator = DataCollator(pad_token_id=run.tokenizer.pad_token_id)
    run.trainer = trainer = trainer_class(
        model=run.model, args=run.args, train_dataset=run.train_ds, eval_dataset=run.eval_ds, data_collator=collator,
        processing_class=run.tokenizer, callbacks=[_BeforeEval(), _ReleaseHostMemory(), _NonFiniteGuard()],
        molora=ctx)
    where = f"resuming from {run.ckpt}" if run.ckpt else "from scratch"
    run.say(f"molora: training {where}: {len(run.train_ds)} examples, world size {run.world}"
            f"{f', ZeRO-{run.zero_stage}' if run.ds_config else ''}; output in {run.out}")


def train(run: TrainRun) -> None:
    """Train (a resume unpickles weights only), or -- when the checkpoint is the end of training -- load its
    weights and finish only the work after training."""
    from . import checkpoint as ckpt_mod
    from .safe_load import weights_only_loads

    ckpt, trainer = run.ckpt, run.trainer
    if run.done_step is None:
        # a resume unpickles weights only (DeepSpeed's own loads would run any code a shard carries)
        with timer(run.timings, "train_s"), (weights_only_loads() if ckpt else contextlib.nullcontext()):
            train_out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        run.global_step, run.train_loss = trainer.state.global_step, train_out.training_loss
    else:
        # Training ended at this checkpoint (a run killed during its final save, evaluation or plots): never
        # another optimizer step.
        run.say(f"molora: {ckpt.name} is the end of training (step {run.done_step}); finishing what came after it: "
                f"final adapter, evaluation, results and plots")
        ckpt_mod.load_adapter_weights(trainer.model, ckpt, zero3=run.ctx.zero3)
        run.global_step, run.train_loss = run.done_step, last_train_loss(ckpt)
    if run.ctx.telemetry is not None:
        run.ctx.telemetry.close()


def save_final_adapter(run: TrainRun) -> Path:
    """``output_dir/adapter``, written into a staging folder and renamed into place (atomic); returns its path."""
    from . import checkpoint as ckpt_mod
    from .storage import disk_full_guard

    adapter_dir = run.out / "adapter"
    tmp = ckpt_mod.staging_dir(run.out, "adapter")
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with disk_full_guard(tmp, run.trainable * 4 + (1 << 20), "the final adapter"):
        ckpt_mod.save_adapter(run.trainer.model, tmp, is_main=run.is_main, zero3=run.ctx.zero3)
    if run.is_main:
        run.tokenizer.save_pretrained(str(tmp))
        ckpt_mod.write_marker(tmp, {"step": run.global_step, "allocation": run.cfg.allocation,
                                    "base_model": run.recipe.model.name_or_path, "fingerprint": run.fingerprint})
        ckpt_mod.commit_dir(tmp, adapter_dir)
    barrier()
    return adapter_dir


def finish(run: TrainRun, adapter_dir: Path) -> dict[str, Any]:
    """Accuracy after training, the summary (metrics.jsonl, results.json written atomically, wandb) and plots."""
    from .host_memory import peak_resident_bytes

    recipe, out = run.recipe, run.out
    if recipe.eval.after:
        with timer(run.timings, "eval_after_s"):
            run.results["after"] = accuracy(run.ctx, run.trainer.model, run.tokenizer, run.acc_rows, run.template,
                                            "after", run.zero_stage == 3)
    run.timings["total_s"] = round(time.perf_counter() - run.t_start, 2)
    summary: dict[str, Any] = {"output_dir": str(out), "adapter": str(adapter_dir),
                               "metrics": str(out / "metrics.jsonl") if recipe.report.jsonl else None,
                               "global_step": run.global_step, "train_loss": run.train_loss,
                               "timings": run.timings, "accuracy": {}, "plots": [], "world_size": run.world,
                               "nonfinite_skipped_steps": run.trainer.nonfinite_skipped,
                               "host_peak_rss_gib": round((peak_resident_bytes() or 0) / 2**30, 2)}
    if not run.is_main:
        run.metrics.close()
        return summary
    before = run.results.get("before") or previous_accuracy(out / "metrics.jsonl", "before")
    for stage, res in (("before", before), ("after", run.results.get("after"))):
        if res:
            summary["accuracy"][stage] = {k: {kk: v[kk] for kk in ("accuracy", "accuracy_norm", "n") if kk in v}
                                          for k, v in res.items() if isinstance(v, dict)}
    if run.wandb_mode:
        summary["wandb"] = {"mode": run.wandb_mode, "dir": os.environ.get("WANDB_DIR")}
    run.metrics.write({"type": "summary", **summary})
    run.metrics.close()
    if recipe.report.plots and recipe.report.jsonl:
        try:
            from .report import render

            summary["plots"] = [str(p) for p in render(out)]
        except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
            print(f"molora: could not render plots: {e}", flush=True)
    write_json_atomic(out / "results.json", summary)
    if run.wandb_mode:
        wandb_summary({"train/global_step": summary["global_step"]}, finish=True)
    return summary
