"""The Hugging Face ``Trainer`` subclass of ``molora train`` (see :mod:`molora.run.train` for why it exists):
aux-loss logging, router telemetry, the non-finite guard, atomic adapter-only checkpoints, host-memory release.
Imports transformers: :func:`molora.run.trainer.build_trainer_class` imports this module when a run needs it.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Optional

import torch
from transformers import Trainer
from transformers import trainer as hf_trainer

from . import checkpoint as ckpt_mod
from .host_memory import peak_resident_bytes, resident_bytes
from .label_logits import restrict_to_labels
from .nonfinite import NonFiniteError, all_finite, local_tensor, nonfinite_entries
from .telemetry import flat_router_scalars, router_headline
from .common import RunContext, barrier, dist
from .router_lr import split_router_groups


class MoLoRATrainer(Trainer):
    """HF Trainer + aux-loss logging, router telemetry, atomic adapter-only checkpoints (see module doc)."""

    def __init__(self, *args, molora: "RunContext", **kwargs):
        super().__init__(*args, **kwargs)
        self.molora = molora
        self._aux_sum = torch.zeros((), dtype=torch.float64)
        self._aux_n = 0
        self._reg_sum = torch.zeros((), dtype=torch.float64)  # weighted router regulariser (top-p entropy)
        self._tokens = torch.zeros((), dtype=torch.float64)
        self._t_last_log = None
        self._last_log_step = 0
        self._eval_time = 0.0
        self._nonfinite_reason: Optional[str] = None   # why the current step is to be dropped
        self._grads_checked_at = -1
        self.nonfinite_skipped = 0                     # steps dropped so far (train.nonfinite: skip)
        self._skips_in_a_row = 0

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the routers in groups of their own at ``router_lr_multiplier`` x the
        learning rate (the scheduler scales every group's initial lr alike)."""
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        split_router_groups(opt, self.model, self.molora.recipe.train.router_lr_multiplier)
        return opt

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The Trainer's resume of the optimizer state; a state written for another set of trainable tensors (torch:
        "a parameter group that doesn't match the size") is a ResumeError naming the checkpoint and this run's
        count of trainable tensors, not a traceback (DeepSpeed loads its own state elsewhere and reports its own error)."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as e:
            if "parameter group" not in str(e):
                raise
            from .resume import ResumeError

            n = sum(1 for p in self.model.parameters() if p.requires_grad)
            raise ResumeError(
                f"{checkpoint}: its optimizer state was written for another set of trainable tensors than this "
                f"run's {n} ({e}). The trainable parameters changed since it was written (another target_modules, "
                f"modules_to_save or allocation, or a molora older than 2026-12-06, which still trained the "
                f"one-expert routers that are frozen now): resume it with the setup and molora that wrote it, or "
                f"start a new output_dir.") from None

    # ---------------------------------------------------------------- non-finite guard (molora.run.nonfinite)
    def _trainable(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _agree(self, flag: bool) -> bool:
        """True on every rank when it is True on any (so all ranks stop, or skip, the same step)."""
        d = dist()
        if d is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.args.device)
        d.all_reduce(t, op=d.ReduceOp.MAX)
        return bool(t.item())

    def _note_nonfinite(self, what: str) -> None:
        if self._nonfinite_reason is None:
            self._nonfinite_reason = what

    def _stop(self, what: Optional[str], applied: bool) -> None:
        """Raise NonFiniteError on every rank (all ranks call this in the same step)."""
        from .checkpoint import find_latest

        step = self.state.global_step + (0 if applied else 1)  # applied: called after the step was counted
        what = what or "another rank saw a non-finite loss, gradient or weight"
        last = find_latest(self.args.output_dir)
        where = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written yet"
        stopped = "Training stopped" + ("" if applied else " before this step was applied")
        raise NonFiniteError(
            f"step {step} of {self.state.max_steps}: {what}. {stopped}; "
            f"{where} (resume with --resume latest after fixing the cause). Usual causes: a learning rate too "
            f"high (train.learning_rate={self.args.learning_rate:g}), fp16 overflow (use bf16), or bad data; "
            f"train.nonfinite: skip drops such steps instead")

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self.reported_loss(super().training_step(model, inputs, num_items_in_batch))
        if not bool(torch.isfinite(loss.detach()).all()):
            # acted on at the optimizer step, together with the other ranks (a rank that stopped alone here
            # would leave the others waiting in the gradient all-reduce)
            self._note_nonfinite(f"the training loss is {float(loss.detach().float().reshape(-1)[0]):g}")
        return loss

    def reported_loss(self, loss):
        """The loss this rank reports for the step: the training step's, unchanged. (An overridable seam: the
        fault-injection tests make one rank report a non-finite loss here, after a finite backward.)"""
        return loss

    def _check_grads(self) -> None:
        """Before clipping and the optimizer step (once per step). Not under DeepSpeed (the engine steps
        inside backward) nor with an fp16 GradScaler (it skips overflow steps and lowers the scale)."""
        if self._grads_checked_at == self.state.global_step or self.is_deepspeed_enabled:
            return
        self._grads_checked_at = self.state.global_step
        if getattr(self.accelerator, "scaler", None) is not None:
            return
        named = [(n, p.grad) for n, p in self._trainable() if p.grad is not None]
        if not all_finite(g for _, g in named):
            self._note_nonfinite("non-finite gradients: " + ", ".join(nonfinite_entries(named, limit=3)))

    def _clip_grad_norm(self, model):
        self._check_grads()  # before clipping spreads a nan over every gradient
        return super()._clip_grad_norm(model)

    def _pre_optimizer_step(self) -> None:
        """Stop, or drop this step, on every rank when any rank saw a non-finite loss or gradient."""
        if self.is_deepspeed_enabled:
            return  # the engine has stepped already: handled in _post_step
        self._check_grads()
        if not self._agree(self._nonfinite_reason is not None):
            return
        reason, self._nonfinite_reason = self._nonfinite_reason, None
        if self.molora.recipe.train.nonfinite != "skip":
            self._stop(reason, applied=False)
        for _, p in self._trainable():
            p.grad = None  # the optimizer skips parameters without a gradient: no update, moments untouched
        self.nonfinite_skipped += 1
        self._skips_in_a_row += 1
        step, limit = self.state.global_step + 1, self.molora.recipe.train.max_nonfinite_skips
        reason = reason or "another rank saw a non-finite loss or gradient"
        if self.is_world_process_zero():
            print(f"molora: step {step}: {reason}; step skipped ({self._skips_in_a_row} in a row, "
                  f"{self.nonfinite_skipped} in all; limit {limit} in a row)", flush=True)
        if self._skips_in_a_row > limit:
            raise NonFiniteError(f"step {step}: {self._skips_in_a_row} steps in a row had non-finite losses or "
                                 f"gradients (train.max_nonfinite_skips={limit}); last: {reason}. The run "
                                 f"diverged: lower train.learning_rate or check the data")
        self.molora.skipped_this_step = True

    def _post_step(self) -> None:
        """After the optimizer step (global_step already counts it): weights finite on every rank."""
        if self.molora.skipped_this_step:
            self.molora.skipped_this_step = False
        else:
            self._skips_in_a_row = 0
        reason, self._nonfinite_reason = self._nonfinite_reason, None  # DeepSpeed: a loss seen in this step
        named = self._trainable()
        if not all_finite(local_tensor(p) for _, p in named):
            reason = "adapter weights became non-finite in the optimizer step: " + ", ".join(
                nonfinite_entries([(n, local_tensor(p)) for n, p in named], limit=3))
        if self._agree(reason is not None):
            self._stop(reason, applied=True)

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.molora.logits_at_labels_only:
            inputs = restrict_to_labels(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        reg = outputs.get("router_regularizer") if isinstance(outputs, dict) else None
        if model.training:
            if self._t_last_log is None:
                self._t_last_log = time.perf_counter()
            if aux is not None:
                self._aux_sum = self._aux_sum + aux.detach().to("cpu", torch.float64)
                self._aux_n += 1
            if reg is not None:
                self._reg_sum = self._reg_sum + reg.detach().to("cpu", torch.float64)
            mask = inputs.get("attention_mask")
            n_tok = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            self._tokens = self._tokens + n_tok.detach().to("cpu", torch.float64)
            coef = self.molora.aux_loss_coef
            ga = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1)
                            or self.args.gradient_accumulation_steps))
            extra = None  # what the model added to the task loss: coef * aux and the router regulariser
            if aux is not None and coef > 0:
                extra = coef * aux.detach()
            if reg is not None:
                extra = reg.detach() if extra is None else extra + reg.detach()
            if extra is not None and num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                # On this path the Trainer neither divides the loss by GA nor undoes its world-size factor
                # (both are right for the token-normalised task loss, wrong for the per-micro-batch aux
                # value). The injected aux gradient follows whatever scales the loss (fp16 loss scaling,
                # the world factor) so it gets 1 / (GA * world) here, and the logged aux term is made
                # c * aux / GA per micro-batch, i.e. c * mean(aux) per step (averaged over ranks).
                scale = 1.0
                if self.args.average_tokens_across_devices:
                    scale = float(self.accelerator.num_processes)
                self.molora.tuner.collector.current.grad_multiplier = 1.0 / (ga * scale)
                loss = loss - extra.to(loss.dtype) * (scale - 1.0 / ga)
        return (loss, outputs) if return_outputs else loss

    # ---------------------------------------------------------------- logging
    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        d = dist()
        if d is None:
            return t
        dev = self.args.device
        t = t.to(dev)
        d.all_reduce(t)
        return t.to("cpu")

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        ctx = self.molora
        is_train_log = "loss" in logs and "learning_rate" in logs
        if is_train_log:
            packed = torch.tensor([float(self._aux_sum), float(self._aux_n), float(self._tokens),
                                   float(self._reg_sum)], dtype=torch.float64)
            packed = self._reduce(packed)
            aux_sum, aux_n, tokens, reg_sum = packed.tolist()
            router = ctx.telemetry.collect(self._reduce) if ctx.telemetry is not None else None
            now = time.perf_counter()
            elapsed = (now - self._t_last_log - self._eval_time) if self._t_last_log else 0.0
            self._t_last_log, self._eval_time = now, 0.0
            self._aux_sum.zero_()
            self._aux_n = 0
            self._tokens.zero_()
            self._reg_sum.zero_()
            if aux_n > 0:
                aux = aux_sum / aux_n
                reg = reg_sum / aux_n
                logs["aux_loss"] = round(aux, 6)
                if reg_sum:
                    logs["router_regularizer"] = round(reg, 6)
                logs["task_loss"] = round(float(logs["loss"]) - ctx.aux_loss_coef * aux - reg, 6)
            steps = self.state.global_step - self._last_log_step
            self._last_log_step = self.state.global_step
            if elapsed > 0:
                logs["tokens_per_s"] = round(tokens / elapsed, 1)
                if steps > 0:
                    logs["s_per_step"] = round(elapsed / steps, 3)
            if ctx.slow_watch is not None and elapsed > 0:
                warning = ctx.slow_watch.observe(steps, elapsed)
                if warning and self.is_world_process_zero():
                    print(f"molora: warning: {warning}", flush=True)
                    ctx.metrics.write({"type": "warning", "step": self.state.global_step, "message": warning})
            if self.nonfinite_skipped:
                logs["nonfinite_skipped"] = self.nonfinite_skipped
            # the largest RSS seen at a step's end (before malloc_trim hands free pages back) over this
            # interval, and the process's peak so far (getrusage: includes peaks inside a step)
            rss = max(self.molora.rss_interval_max, resident_bytes() or 0)
            self.molora.rss_interval_max = 0
            if rss:
                logs["host_rss_gib"] = round(rss / 2**30, 2)
            peak = peak_resident_bytes()
            if peak is not None:
                logs["host_peak_rss_gib"] = round(peak / 2**30, 2)
            if router is not None:
                logs.update(router_headline(router))
            record = {"type": "train", "step": self.state.global_step, **logs, "tokens": tokens}
            if router is not None:
                record["router"] = router
            ctx.metrics.write(record)
            super().log(logs, start_time)
            if router is not None and ctx.use_wandb and self.is_world_process_zero():
                try:
                    import wandb

                    if wandb.run is not None:
                        wandb.run.log({**flat_router_scalars(router), "train/global_step": self.state.global_step})
                except Exception:  # noqa: BLE001 - telemetry must never stop training
                    pass
            return
        kind = "eval" if any(k.startswith("eval_") for k in logs) else "train_end" if "train_runtime" in logs \
            else "log"
        ctx.metrics.write({"type": kind, "step": self.state.global_step, **logs})
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._eval_time += time.perf_counter() - t0

    # ---------------------------------------------------------------- saving
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        ckpt_mod.save_adapter(self.model, output_dir, is_main=self.args.should_save, zero3=self.molora.zero3)
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        from .storage import disk_full_guard

        name = f"{hf_trainer.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with disk_full_guard(ckpt_mod.staging_dir(self._get_output_dir(trial=trial), name),
                             self.molora.checkpoint_bytes, name):
            self._save_checkpoint_atomic(model, trial)

    def _save_checkpoint_atomic(self, model, trial) -> None:
        step = self.state.global_step
        run_dir = self._get_output_dir(trial=trial)
        name = f"{hf_trainer.PREFIX_CHECKPOINT_DIR}-{step}"
        final = os.path.join(run_dir, name)
        tmp = ckpt_mod.staging_dir(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        self.store_flos()
        self.save_model(str(tmp), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_scaler(str(tmp))
            self._save_rng_state(str(tmp))
        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control]
                       if isinstance(c, hf_trainer.ExportableState)]:
                self.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
            self.state.save_to_json(os.path.join(tmp, hf_trainer.TRAINER_STATE_NAME))
        barrier()  # every rank has written its part (DeepSpeed shards, RNG states)
        if self.args.should_save:
            ckpt_mod.write_marker(tmp, {"step": step, "world_size": self.args.world_size,
                                        "allocation": self.molora.allocation, "setup": self.molora.setup,
                                        "fingerprint": self.molora.fingerprint})
            ckpt_mod.commit_dir(tmp, final)
            hf_trainer.rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                          best_model_checkpoint=self.state.best_model_checkpoint,
                                          use_mtime=False)
        barrier()
