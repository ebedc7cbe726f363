"""What a checkpoint was made with, and whether a run may resume from it.

Every checkpoint's completion marker (:mod:`molora.run.checkpoint`) records:

* the **setup**: whether DeepSpeed ran, its ZeRO stage and the world size. The optimizer state is stored in
  that layout (one ``optimizer.pt``, or DeepSpeed's per-rank partitions under ``global_step<N>/``): a resume
  with another layout would silently start a fresh optimizer and LR schedule, so it is refused, always;
* a **fingerprint** of everything that shapes the trained weights: the recipe's model, data, allocation and
  training keys (``section.key`` -> value; logging, saving, evaluation and reporting keys are left out), the
  SHA-256 of the training rows as loaded (a changed file, a flipped label, another ``max_train_examples``),
  and the world size. A resume whose fingerprint differs is refused, naming each differing key with both
  values, unless the user allows those keys (``--resume-allow train.learning_rate,data`` or ``all``).

:func:`training_finished` tells a checkpoint taken at the last step: resuming it finishes only the work after
training (final adapter, evaluation, plots), never another optimizer step.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

__all__ = ["OPERATIONAL_KEYS", "NOT_FINGERPRINTED", "ResumeError", "added_at_default", "fingerprint", "setup_of", "checkpoint_setup", "check_setup", "check_fingerprint",
           "training_finished", "parse_allow"]

#: recipe keys that say how a run is carried out, not what it computes: where it writes, how often it logs and
#: saves, how many threads and loader workers it uses (a sweep compares cells without them, a resume may change them)
OPERATIONAL_KEYS = frozenset({
    "train.output_dir", "train.overwrite_output_dir", "train.logging_steps", "train.logging_first_step",
    "train.save_steps", "train.save_strategy", "train.save_total_limit", "train.run_name",
    "train.dataloader_num_workers", "train.threads",
})
#: recipe keys that do not change the trained weights (never part of the fingerprint)
NOT_FINGERPRINTED = OPERATIONAL_KEYS | {
    "train.eval_strategy", "train.eval_steps",
    "train.per_device_eval_batch_size", "train.deepspeed",
    "train.nonfinite", "train.max_nonfinite_skips", "data.train_file", "data.eval_file", "data.packaged",
    "data.hf_dataset", "data.hf_eval_split",
    "data.max_eval_examples", "data.validation_size", "data.max_train_examples",
}
NOT_FINGERPRINTED_SECTIONS = ("eval.", "report.")


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed by this run (the message names what differs and what to do)."""


def flatten_recipe(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section": {"key": v}}`` -> ``{"section.key": v}`` (nested dicts too, ``train.extra`` kept whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != "train.extra":
            out.update(flatten_recipe(v, key + "."))
        else:
            out[key] = v
    return out


def rows_sha256(rows: Sequence[dict]) -> str:
    """SHA-256 of training rows as loaded (order and content; JSON with sorted keys)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def fingerprint(recipe_dict: dict[str, Any], train_rows: Sequence[dict], world_size: int) -> dict[str, Any]:
    """``{"section.key": value, ..., "data.train_rows_sha256": ..., "world_size": N}`` (see module doc)."""
    flat = {k: v for k, v in flatten_recipe(recipe_dict).items()
            if k not in NOT_FINGERPRINTED and not k.startswith(NOT_FINGERPRINTED_SECTIONS)}
    flat["data.train_rows"] = len(train_rows)
    flat["data.train_rows_sha256"] = rows_sha256(train_rows)
    flat["world_size"] = int(world_size)
    return flat


def setup_of(deepspeed: bool, zero_stage: int, world_size: int) -> dict[str, Any]:
    return {"deepspeed": bool(deepspeed), "zero_stage": int(zero_stage) if deepspeed else None,
            "world_size": int(world_size)}


def checkpoint_setup(ckpt: Path, marker: dict[str, Any]) -> dict[str, Any]:
    """The setup a checkpoint was written under (from its marker; older markers: inferred from its files)."""
    if "setup" in marker:
        return marker["setup"]
    ds = any(p.is_dir() and p.name.startswith("global_step") for p in Path(ckpt).iterdir())
    return {"deepspeed": ds, "zero_stage": None, "world_size": int(marker.get("world_size", 1))}


def _describe(setup: dict[str, Any]) -> str:
    if setup.get("deepspeed"):
        stage = setup.get("zero_stage")
        return f"DeepSpeed{f' ZeRO-{stage}' if stage is not None else ''} with {setup['world_size']} process(es)"
    return f"no DeepSpeed, {setup['world_size']} process(es)"


def check_setup(ckpt: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse a resume whose optimizer-state layout differs (DeepSpeed on/off, ZeRO stage, world size)."""
    problems = []
    if saved.get("deepspeed") != now["deepspeed"]:
        problems.append("DeepSpeed " + ("on" if saved.get("deepspeed") else "off") + " there, "
                        + ("on" if now["deepspeed"] else "off") + " now")
    elif now["deepspeed"]:
        if saved.get("zero_stage") is not None and saved.get("zero_stage") != now["zero_stage"]:
            problems.append(f"ZeRO stage {saved.get('zero_stage')} there, {now['zero_stage']} now")
        if saved.get("world_size") != now["world_size"]:
            problems.append(f"{saved.get('world_size')} processes there, {now['world_size']} now")
    if problems:
        raise ResumeError(
            f"{ckpt} was written under {_describe(saved)}; this run is {_describe(now)} ({'; '.join(problems)}). "
            f"Its optimizer state is stored in that layout, so resuming here would silently restart the optimizer "
            f"and the LR schedule. Resume with the same launcher setup"
            + (f" (--train.deepspeed CONFIG with ZeRO-{saved.get('zero_stage')}, {saved.get('world_size')} "
               f"processes)" if saved.get("deepspeed") else " (without --train.deepspeed)")
            + ", or start a new output_dir.")


def parse_allow(value: Optional[str]) -> set[str]:
    """``"train.learning_rate,data"`` -> {"train.learning_rate", "data"}; ``"all"`` allows everything."""
    if not value:
        return set()
    return {v.strip() for v in value.split(",") if v.strip()}


def _allowed(key: str, allow: Iterable[str]) -> bool:
    for a in allow:
        if a == "all" or key == a or key.startswith(a + "."):
            return True
    return False


def _schema_default(key: str) -> Any:
    """The recipe schema's default of ``section.key`` (a sentinel when there is none)."""
    from .recipe import Recipe

    section, _, name = key.partition(".")
    field = Recipe.model_fields.get(section)
    fields = getattr(getattr(field, "annotation", None), "model_fields", {})
    if name not in fields:
        return _NO_DEFAULT
    default = fields[name].get_default(call_default_factory=True)
    return default


_NO_DEFAULT = object()


def added_at_default(key: str, recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether ``key`` is missing from a record made by an older molora and is now at the schema's default: a
    key a newer version added, whose default keeps the behaviour the record was made with (every new recipe
    field must default to what molora did before it existed). Resume and the sweep's finished cells both accept
    such keys."""
    return key not in recorded and key in now and now[key] == _schema_default(key)


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:16] + "…" + s[-8:]


def check_fingerprint(ckpt: Path, saved: Optional[dict[str, Any]], now: dict[str, Any],
                      allow: Iterable[str] = ()) -> list[str]:
    """Raise :class:`ResumeError` naming every key whose value differs, unless allowed. Returns the allowed
    differences as ``"key: old -> new"`` lines (for the log)."""
    if saved is None:
        return []
    allow = set(allow)
    known = set(saved) | set(now)
    unknown = sorted(a for a in allow if a != "all" and not any(k == a or k.startswith(a + ".") for k in known))
    if unknown:  # a misspelt key would otherwise be ignored and the resume refused (or, worse, a typo go unnoticed)
        import difflib

        sections = sorted({k.split(".", 1)[0] for k in known})
        close = difflib.get_close_matches(unknown[0], sorted(known) + sections, n=3)
        raise ResumeError(f"--resume-allow {', '.join(unknown)}: not a key of the checkpoint's fingerprint"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + f"; give keys such as train.learning_rate, whole sections ({', '.join(sections)}) or all")
    diffs, accepted = [], []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<unset>"), now.get(key, "<unset>")
        if a == b:
            continue
        if added_at_default(key, saved, now):
            continue
        line = f"{key}: {_short(a)} (checkpoint) -> {_short(b)} (now)"
        (accepted if _allowed(key, allow) else diffs).append(line)
    if diffs:
        keys = sorted({d.split(":", 1)[0] for d in diffs})
        raise ResumeError(
            f"{ckpt} was made with a different setup than this run:\n  " + "\n  ".join(diffs)
            + f"\nResume with the recipe and data it was made with, or accept the change with --resume-allow "
              f"{','.join(keys)} (or --resume-allow all).")
    return accepted


def training_finished(ckpt: Path, recipe_max_steps: int) -> Optional[int]:
    """The checkpoint's step when it was taken at the end of training (nothing left to train), else None."""
    try:
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step = int(state.get("global_step", 0))
    target = recipe_max_steps if recipe_max_steps > 0 else int(state.get("max_steps", 0) or 0)
    return step if target > 0 and step >= target else None
