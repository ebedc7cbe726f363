"""What the steps of a training run (:mod:`.train_steps`) use: the process environment, TrainingArguments from a
recipe, the precision in words, accuracy before/after training, and what a previous run left in ``output_dir``."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from .common import RunContext, RunError, barrier, free_port, write_json_atomic
from .recipe import Recipe, RecipeError


def prepare_environment(recipe: Recipe) -> Optional[str]:
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


def patch_deepspeed_for_cpu() -> None:
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


def previous_run_artifacts(out: Path) -> list[str]:
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


def clear_previous_run(out: Path) -> None:
    from .checkpoint import clean_staging, list_checkpoints

    for p in list_checkpoints(out, complete_only=False):
        shutil.rmtree(p, ignore_errors=True)
    for name in ("metrics.jsonl", "results.json", "predictions_before.json", "predictions_after.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("adapter", "plots"):
        shutil.rmtree(out / name, ignore_errors=True)
    clean_staging(out)


def training_arguments(recipe: Recipe, report_to: list[str], ds_config: Optional[dict]):
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


def accuracy(ctx: RunContext, model, tokenizer, rows, template, stage: str, all_ranks: bool) -> Optional[dict]:
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
            wandb_summary({f"accuracy_{stage}/{k}": v["accuracy"] for k, v in result.items() if isinstance(v, dict)})
        parts = []
        for kind in ("loglik", "generation"):
            if kind in result:
                norm = (f", accuracy_norm {result[kind]['accuracy_norm']:.3f}" if "accuracy_norm" in result[kind]
                        else "")
                parts.append(f"{kind} {result[kind]['accuracy']:.3f}{norm} (n={result[kind]['n']})")
        print(f"molora: accuracy {stage} training: " + ", ".join(parts), flush=True)
    return result if ctx.is_main else None


def wandb_summary(values: dict[str, float], finish: bool = False) -> None:
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


def precision(recipe: Recipe, cuda: bool) -> str:
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


def finished_run_complete(out: Path, step: int) -> bool:
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


def last_train_loss(ckpt: Path) -> Optional[float]:
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


def checkpoint_step(path: Optional[Path]) -> Optional[int]:
    if path is None:
        return None
    try:
        return int(Path(path).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def previous_accuracy(metrics: Path, stage: str) -> Optional[dict]:
    """The accuracy a run measured before it was interrupted (a resumed run does not measure it again)."""
    from .telemetry import read_metrics

    try:
        found = [r for r in read_metrics(metrics) if r.get("type") == "accuracy" and r.get("stage") == stage]
    except OSError:
        return None
    return found[-1] if found else None
