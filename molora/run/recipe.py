"""YAML recipes for ``molora train``: schema, validation and ``--key value`` overrides.

A recipe has six sections (every key optional except where noted; unknown keys are errors)::

    model:       name_or_path (packaged name like smollm2-135m, local HF checkpoint dir, or cached HF id), dtype,
                 load_in_4bit / load_in_8bit (+ bnb_4bit_quant_type, bnb_4bit_use_double_quant, ...)
    data:        packaged (bbc-news) | train_file [+ eval_file] | hf_dataset (+ hf_subset, hf_split,
                 hf_eval_split, hf_where, columns), format (choices | alpaca | messages | auto), prompt_template,
                 cutoff_len, train_on_inputs, max_train_examples, max_eval_examples, validation_size
    allocation:  every field of MoLoRAConfig a user sets (num_experts "2,4,6,8", top_k, r, lora_alpha, lora_dropout,
                 ...: molora.allocation.adapter_fields, from which this section is built) + auto_* keys
    train:       Hugging Face TrainingArguments names (output_dir, max_steps, num_train_epochs,
                 per_device_train_batch_size, gradient_accumulation_steps, learning_rate, lr_scheduler_type,
                 warmup_steps/ratio, bf16/fp16, gradient_checkpointing, eval/save/logging steps, seed,
                 deepspeed: path to a DeepSpeed JSON, ...); ``extra`` passes any other TrainingArguments field
    eval:        accuracy before/after training: loglik (all options scored) and generation (fewer rows)
    report:      wandb (offline unless WANDB_API_KEY is set), metrics.jsonl, PNG plots

Validation happens before torch is imported (this module needs only pydantic and PyYAML) so a typo fails in
well under a second, naming the key: ``train.lerning_rate: unknown key (did you mean 'learning_rate'?)``.

Relative paths (data files, deepspeed config, output_dir) are resolved against the current directory first
and, for files that must exist, against the recipe's own directory when not found there.

Over 400 lines: one schema per section, with the cross-field checks that must run before torch is imported. The
``molora`` command imports the package deferred (no torch, no PEFT registration; see ``molora_cli``), and the
allocation specs and router registry it validates against are torch-free, so ``molora train --validate`` answers
in about a second.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator,
                      model_validator)

from ..allocation import adapter_fields
from ..allocation import specs as allocation_specs
from .model_lookup import (LAYER_COUNT_KEYS, PACKAGED_MODEL_LAYERS, PACKAGED_MODEL_NAMES,  # noqa: F401  (kept here)
                           model_location_problem, model_num_layers)

__all__ = ["RecipeError", "Recipe", "load_recipe", "parse_overrides", "apply_overrides", "recipe_from_dict",
           "PACKAGED_MODEL_NAMES", "PACKAGED_DATASET_NAMES", "model_num_layers", "resolve_recipe_allocation"]

PACKAGED_DATASET_NAMES = ("bbc-news",)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")


class RecipeError(ValueError):
    """An invalid recipe or override; the message names the key (``section.key``) and what is wrong."""


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` (YAML) for a learning rate, a coefficient, a norm... is an error
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)



class ModelSection(_Section):
    name_or_path: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"  # float64: for equivalence checks
    # QLoRA-style quantized base (bitsandbytes; transformers' BitsAndBytesConfig names). The projections inside the
    # blocks are quantized, embeddings and lm_head stay in `dtype`; the adapters train in float32.
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # None: model.dtype
    llm_int8_threshold: float = Field(6.0, ge=0)

    @model_validator(mode="after")
    def _one_quantization(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit are exclusive; set one")
        return self

    @property
    def quantization(self) -> Optional[str]:
        """"4bit", "8bit" or None."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def bnb_config_kwargs(self) -> Optional[dict[str, Any]]:
        """Keyword arguments of transformers' ``BitsAndBytesConfig`` (dtype names as strings), or None."""
        if self.load_in_4bit:
            return dict(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                        bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
                        bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype or self.dtype)
        if self.load_in_8bit:
            return dict(load_in_8bit=True, llm_int8_threshold=self.llm_int8_threshold)
        return None


class DataSection(_Section):
    packaged: Optional[str] = None
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    hf_dataset: Optional[str] = None                       # a Hub id or a local dataset folder (molora.run.hf_data)
    hf_subset: Optional[str] = None                        # the dataset's configuration, e.g. "rte" of nyu-mll/glue
    hf_split: str = "train"
    hf_eval_split: Optional[str] = None                    # None: carve validation_size rows out of the train split
    hf_where: Optional[dict[str, Any]] = None              # keep rows whose columns equal these values
    columns: Optional[dict[str, Any]] = None               # molora field -> column, "a.b" path, "{a} {b}" or a literal
    format: str = "auto"                                   # a registered row format (molora.run.formats) or auto
    prompt_template: Optional[str] = None
    cutoff_len: int = Field(256, ge=2)
    train_on_inputs: bool = False
    max_train_examples: Optional[int] = Field(None, ge=1)
    max_eval_examples: Optional[int] = Field(None, ge=1)
    validation_size: int = Field(200, ge=1)

    @field_validator("format")
    @classmethod
    def _format(cls, v):
        from .formats import format_names  # the registry (pure Python)

        if v not in format_names():
            raise ValueError(f"format={v!r} is not a known row format; allowed: {', '.join(format_names())}")
        return v

    @field_validator("packaged")
    @classmethod
    def _known_dataset(cls, v):
        if v is not None and v not in PACKAGED_DATASET_NAMES:
            raise ValueError(f"unknown packaged data set {v!r}; packaged: {', '.join(PACKAGED_DATASET_NAMES)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("packaged", "train_file", "hf_dataset") if getattr(self, k) is not None]
        if not given:
            raise ValueError("give one of data.packaged (e.g. bbc-news), data.train_file or data.hf_dataset")
        if len(given) > 1:
            raise ValueError(f"{' and '.join('data.' + k for k in given)} are exclusive; give one")
        if self.hf_dataset is None:
            extra = [k for k in ("hf_subset", "hf_eval_split", "hf_where", "columns") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join('data.' + k for k in extra)} only apply with data.hf_dataset")
        elif self.eval_file is not None and self.hf_eval_split is not None:
            raise ValueError("data.eval_file and data.hf_eval_split are exclusive; give one")
        return self


#: every field of ``AdapterFields`` with the recipe's defaults: a new adapter field is a recipe key by itself
_AdapterFieldsSection = create_model("_AdapterFieldsSection", __base__=_Section, __module__=__name__,
                                     **adapter_fields.recipe_fields())


class AllocationSection(_AdapterFieldsSection):
    """The allocation section: the adapter's fields (``molora.allocation.adapter_fields``, checked by the same
    functions ``MoLoRAConfig`` uses) plus the ``auto_*`` keys of data-driven allocations."""

    # num_experts: "auto:METHOD" (molora.run.allocate): how the per-layer scores become expert counts
    auto_beta: Optional[float] = Field(None, ge=0)         # E_l ∝ score^beta (None: the method's default)
    auto_min: Optional[int] = Field(None, ge=1)            # experts per layer, at least (None: top_k, or 1)
    auto_max: Optional[int] = Field(None, ge=1)            # and at most
    auto_groups: Optional[int] = Field(None, ge=1)         # average the scores over G contiguous groups first
    auto_calib_examples: int = Field(64, ge=1)             # training rows the data-driven signals read

    @field_validator(*adapter_fields.FIELD_NAMES)
    @classmethod
    def _field(cls, v, info):
        adapter_fields.check_field(info.field_name, v)  # AllocationError (a ValueError) naming what is allowed
        return v

    @model_validator(mode="after")
    def _together(self):
        adapter_fields.check_together(self)
        return self


class TrainSection(_Section):
    """Hugging Face ``TrainingArguments`` names (plus ``deepspeed``: a JSON path, and ``extra``)."""

    output_dir: str = "runs/molora"
    overwrite_output_dir: bool = False
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    optim: str = "adamw_torch"
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    use_reentrant: bool = True
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: Optional[int] = Field(None, ge=1)
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    save_steps: int = Field(500, ge=1)
    save_total_limit: Optional[int] = Field(None, ge=1)
    logging_steps: int = Field(10, ge=1)
    logging_first_step: bool = True
    seed: int = 42
    data_seed: Optional[int] = None
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = "random"
    dataloader_num_workers: int = Field(0, ge=0)
    #: compute the LM head only at positions that carry a label (same loss; faster with answer-only data)
    logits_at_labels_only: bool = True
    #: the routers' learning rate = learning_rate x this (routers see tiny gradients while B is small; > 1 lets
    #: them specialise sooner)
    router_lr_multiplier: float = Field(1.0, gt=0)
    #: CPU threads of this process (None: OMP_NUM_THREADS, else the cores it may use / the ranks on this machine;
    #: molora.run.cpu_threads); on a machine shared with other work fewer are faster
    threads: Optional[int] = Field(None, ge=1)
    deepspeed: Optional[str] = None
    run_name: Optional[str] = None
    #: what a non-finite loss or gradient does: "error" stops the run naming the step (the last checkpoint is
    #: good); "skip" drops that optimizer step (no update) and goes on, up to max_nonfinite_skips in a row
    nonfinite: Literal["error", "skip"] = "error"
    max_nonfinite_skips: int = Field(10, ge=1)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` as false

    @field_validator("lr_scheduler_type")
    @classmethod
    def _scheduler(cls, v):
        if v not in LR_SCHEDULERS:
            raise ValueError(f"unknown scheduler {v!r}; allowed: {', '.join(LR_SCHEDULERS)}")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.bf16 and self.fp16:
            raise ValueError("train.bf16 and train.fp16 are exclusive")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("train.eval_strategy=steps needs train.eval_steps")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("train.max_steps must be a positive number of steps, or -1 to use num_train_epochs")
        own = set(type(self).model_fields)
        clash = sorted(set(self.extra) & own)
        if clash:
            raise ValueError(f"train.extra repeats {clash}; set them directly under train:")
        return self


class EvalSection(_Section):
    before: bool = True
    after: bool = True
    loglik: bool = True
    loglik_max_examples: Optional[int] = Field(200, ge=1)
    generation: bool = True
    generation_max_examples: Optional[int] = Field(50, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    #: the metric a sweep selects settings by and lists first (lm-eval's convention per task: accuracy for
    #: CSQA/ScienceQA/GLUE, accuracy_norm -- log-likelihood per byte of the option -- for OpenBookQA/ARC/HellaSwag)
    primary_metric: Literal["accuracy", "accuracy_norm"] = "accuracy"
    #: keep per-question predictions of the log-likelihood scoring (predictions_<stage>.json beside results.json):
    #: what paired comparisons between runs read
    save_predictions: bool = True


class ReportSection(_Section):
    wandb: bool = True
    wandb_project: str = "molora"
    wandb_mode: Literal["auto", "offline", "online", "disabled"] = "auto"
    jsonl: bool = True
    router_telemetry: bool = True
    plots: bool = True


class Recipe(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    allocation: AllocationSection = Field(default_factory=AllocationSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    report: ReportSection = Field(default_factory=ReportSection)
    #: where the recipe came from (set by load_recipe; not a recipe key)
    _source: Optional[str] = PrivateAttr(None)

    @property
    def source(self) -> Optional[str]:
        return self._source

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)

    def molora_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``molora.MoLoRAConfig`` (task_type CAUSAL_LM)."""
        kw = {k: v for k, v in self.allocation.model_dump().items() if not k.startswith("auto_")}
        kw["task_type"] = "CAUSAL_LM"
        return kw


# ----------------------------------------------------------------------------------------------------- allocation


def resolve_recipe_allocation(recipe: "Recipe") -> Optional[list]:
    """The per-layer allocation of a recipe, resolved from the model's config alone (before any model loads).

    Returns the list of ``LayerAllocation`` (None when the layer count cannot be read from a config). Raises
    :class:`RecipeError` naming ``allocation`` for an impossible allocation (top-k above a layer's experts, more
    groups than layers, a list of the wrong length). Warnings (a budget the shape cannot meet exactly, groups
    of top_k / r that cut through those of num_experts) are emitted as ``AllocationWarning``.
    """
    layers = model_num_layers(recipe.model.name_or_path)
    if layers is None:
        return None
    a = recipe.allocation
    if allocation_specs.is_auto(a.num_experts):
        if a.expert_budget is None:
            raise RecipeError(f"allocation.num_experts={a.num_experts!r} needs allocation.expert_budget (the total "
                              f"experts to distribute)")
        if a.expert_budget < layers:
            raise RecipeError(f"allocation.expert_budget={a.expert_budget} is below one expert per layer "
                              f"({recipe.model.name_or_path}: {layers} layers)")
        return None  # computed from the model before injection
    try:
        return allocation_specs.resolve_allocation(a.num_experts, a.top_k, a.r, layers,
                                                   expert_budget=a.expert_budget, router=a.router,
                                                   num_experts_mlp=a.num_experts_mlp)
    except ValueError as e:  # AllocationError
        raise RecipeError(f"allocation ({recipe.model.name_or_path}, {layers} layers): {e}") from None


# ----------------------------------------------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """An override value as YAML (``20`` -> int, ``true`` -> bool, ``[1,2]`` -> list, ``null`` -> None)."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """``["--train.max_steps", "20", "--data.cutoff_len=64"]`` -> ``[("train.max_steps", 20), ...]``."""
    out: list[tuple[str, Any]] = []
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise RecipeError(f"unexpected argument {a!r}; overrides look like --section.key value "
                              f"(e.g. --train.max_steps 20)")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _looks_negative(args[i + 1])):
                raise RecipeError(f"override --{key} needs a value (e.g. --{key} VALUE)")
            raw = args[i + 1]
            i += 2
        if key == "deepspeed":  # the usual HF/DeepSpeed flag
            key = "train.deepspeed"
        out.append((key, _parse_value(raw)))
    return out


def _looks_negative(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def apply_overrides(data: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a (nested) recipe dict. Unknown sections/keys are caught by validation, but a key
    that descends into a non-mapping fails here."""
    for key, value in overrides:
        parts = key.split(".")
        if any(not p for p in parts):
            raise RecipeError(f"bad override key {key!r}; use --section.key value")
        node = data
        for j, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"override {key}: {'.'.join(parts[:j + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------------------------------- loading


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union["))))
        kind = e["type"]
        if kind == "extra_forbidden":
            parent_model = _model_at(e["loc"][:-1])
            hint = ""
            if parent_model is not None:
                key = str(e["loc"][-1])
                close = difflib.get_close_matches(key, list(parent_model.model_fields), n=1)
                if close:
                    hint = f" (did you mean {close[0]!r}?)"
                elif parent_model is Recipe:  # a key given without its section: --max_steps for train.max_steps
                    owners = [f"{name}.{key}" for name, f in Recipe.model_fields.items()
                              if key in getattr(f.annotation, "model_fields", {})]
                    if owners:
                        hint = f" (did you mean {' or '.join(repr(o) for o in owners)}?)"
                fields = list(parent_model.model_fields)
                if len(fields) > 12:  # the close ones are named; the rest in short
                    alike = difflib.get_close_matches(key, fields, n=6, cutoff=0.4)
                    hint += f"; similar keys here: {', '.join(alike)} ({len(fields)} in all)" if alike else \
                        f"; {len(fields)} keys here, e.g. {', '.join(fields[:6])}"
                else:
                    hint += f"; allowed here: {', '.join(fields)}"
            lines.append(f"{loc}: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"{loc}: required key missing")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            inp = e.get("input")
            shown = "" if isinstance(inp, dict) or repr(inp) in msg else f" (got {inp!r})"
            lines.append(f"{loc or '(recipe)'}: {msg}{shown}")
    # a union failing on every member repeats the key: keep the first message per key
    seen, uniq = set(), []
    for line in lines:
        k = line.split(":", 1)[0]
        if k in seen:
            continue
        seen.add(k)
        uniq.append(line)
    return f"invalid recipe {source}:\n  " + "\n  ".join(uniq)


def _model_at(loc: Sequence[Any]):
    model: Any = Recipe
    for p in loc:
        field = getattr(model, "model_fields", {}).get(p)
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return None
    return model


def _resolve_existing(value: str, base: Optional[Path]) -> Optional[Path]:
    p = Path(os.path.expanduser(value))
    if p.exists():
        return p.resolve()
    if not p.is_absolute() and base is not None and (base / p).exists():
        return (base / p).resolve()
    return None


def _check_files(recipe: Recipe, base: Optional[Path]) -> None:
    problems = []
    for key, value in (("data.train_file", recipe.data.train_file), ("data.eval_file", recipe.data.eval_file)):
        if value is None:
            continue
        found = _resolve_existing(value, base)
        if found is None or not found.is_file():
            problems.append(f"{key}: file not found: {value}" + (f" (looked in {Path.cwd()} and {base})" if base else ""))
        else:
            setattr(recipe.data, key.split(".")[1], str(found))
    hf = recipe.data.hf_dataset
    if hf is not None:  # a local dataset folder (beside the recipe, too), else a Hub id
        found = _resolve_existing(hf, base)
        if found is not None and found.is_dir():
            recipe.data.hf_dataset = str(found)
        elif hf.startswith((".", "/", "~")):
            problems.append(f"data.hf_dataset: folder not found: {hf} (a Hub id looks like owner/name)")
    ds = recipe.train.deepspeed
    if ds is not None:
        found = _resolve_existing(ds, base)
        if found is None or not found.is_file():
            problems.append(f"train.deepspeed: file not found: {ds}")
        else:
            try:
                cfg = json.loads(found.read_text(encoding="utf-8"))
                if not isinstance(cfg, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                problems.append(f"train.deepspeed: {found} is not a valid DeepSpeed JSON config: {e}")
            else:
                recipe.train.deepspeed = str(found)
    quant = recipe.model.quantization
    if quant is not None:
        key = f"model.load_in_{quant}"
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"{key}: a {quant} base needs bitsandbytes, which is not installed "
                            f"(pip install 'bitsandbytes>=0.50,<0.51', or molora[quant]); or set {key}: false")
        if recipe.train.deepspeed is not None:
            problems.append(f"{key} with train.deepspeed: a quantized base is supported in single-process "
                            f"training only (QLoRA on one GPU); drop train.deepspeed or {key}")
    name = recipe.model.name_or_path
    if name not in PACKAGED_MODEL_NAMES and name.startswith(("/", "./", "../", "~")):
        found = _resolve_existing(name, base)
        if found is None or not found.is_dir():
            problems.append(f"model.name_or_path: directory not found: {name} (packaged models: "
                            f"{', '.join(PACKAGED_MODEL_NAMES)})")
        else:
            recipe.model.name_or_path = str(found)
    if problems:
        raise RecipeError(f"invalid recipe {recipe.source or ''}:\n  " + "\n  ".join(problems))


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>", base_dir: Optional[Path] = None,
                     check_files: bool = True) -> Recipe:
    """Validate a recipe dict (as read from YAML, overrides applied)."""
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: expected a mapping of sections (model, data, allocation, "
                          f"train, eval, report), got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source)) from None
    recipe._source = source
    if check_files:
        _check_files(recipe, base_dir)
    return recipe


def load_recipe(path: Union[str, os.PathLike], overrides: Sequence[Union[str, tuple[str, Any]]] = (),
                check_files: bool = True) -> Recipe:
    """Read, override and validate a YAML recipe.

    Args:
        path: the YAML file.
        overrides: ``["--train.max_steps", "20", ...]`` (command-line form) or ``[("train.max_steps", 20)]``.
    Raises:
        RecipeError: unreadable YAML, unknown key, wrong type, missing file (message names the key).
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise RecipeError(f"recipe {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start} "
                          f"(line {line}); save the file as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    ov = list(overrides)
    if ov and isinstance(ov[0], str):
        ov = parse_overrides(ov)  # type: ignore[arg-type]
    if ov:
        if not isinstance(data, dict):
            raise RecipeError(f"invalid recipe {path}: expected a mapping of sections")
        data = apply_overrides(data, ov)  # type: ignore[arg-type]
    return recipe_from_dict(data, source=str(path), base_dir=p.resolve().parent, check_files=check_files)
