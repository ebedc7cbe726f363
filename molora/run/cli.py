"""The ``molora`` command line.

    molora train RECIPE.yaml [--key value ...]        fine-tune from a YAML recipe (see recipes/)
    molora report OUTPUT_DIR                          loss curves and expert-load heatmap as PNG
    molora bench kernels|train|generate|eval [opts] benchmarks (JSON + PNG + table)
    molora convert-mola SRC DST --num-experts 2,4,6,8 --top-k 2
    molora allocation MODEL --num-experts ▽ --top-k 2 --r 8   print the resolved per-layer table
    molora allocate RECIPE.yaml --method block-influence --budget 120   data-driven allocation
    molora sweep RECIPE.yaml --allocations ▽,lora,base --search train.learning_rate=1e-4,3e-4   tuned study
    molora split FILE.jsonl --out DIR --sizes dev=500,test=500       carve validation / test slices
    molora generate RECIPE.yaml --prompt TEXT | --file ROWS.jsonl     completions with the tuned model
    molora chat RECIPE.yaml                                           interactive chat (chat template)
"""
from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


def _convert(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="molora convert-mola",
                                description="Convert a checkpoint of the original MoLA code into a molora checkpoint.")
    p.add_argument("src", help="directory with adapter_model.bin and adapter_config.json (original MoLA)")
    p.add_argument("dst", help="output directory (a PEFT checkpoint loadable with PeftModel.from_pretrained)")
    p.add_argument("--num-experts", required=True, help="experts per layer: int, block notation '2,4,6,8' or a "
                                                        "comma list with one entry per layer")
    p.add_argument("--top-k", required=True, help="top-k per layer, same notation")
    p.add_argument("--num-layers", type=int, default=None, help="layers of the base model (default: from the keys)")
    p.add_argument("--base-model", default=None, help="base model name/path to record in adapter_config.json")
    a = p.parse_args(argv)
    from ..allocation import AllocationError
    from ..tuner.convert import ConversionError, convert_mola

    try:
        dst = convert_mola(a.src, a.dst, _cli_spec(a.num_experts), _cli_spec(a.top_k), num_layers=a.num_layers,
                           base_model_name_or_path=a.base_model)
    except (ConversionError, AllocationError, FileNotFoundError) as e:
        print(f"molora convert-mola: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst} (load with PeftModel.from_pretrained(base_model, {str(dst)!r}) after `import molora`)")
    return 0


def _cli_spec(value: str):
    """Command-line allocation: '8' -> 8; '2,4,6,8', '2468' (MoLA block notation) and preset names stay strings."""
    v = value.strip()
    return int(v) if v.isdigit() and len(v) == 1 else v


def _allocation(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="molora allocation",
                                description="Print the per-layer allocation table for a model (no weights loaded).")
    p.add_argument("model", help="packaged name (smollm2-135m), local path or cached HF id")
    p.add_argument("--num-experts", default="2,4,6,8")
    p.add_argument("--top-k", default="2")
    p.add_argument("--r", default="8")
    p.add_argument("--expert-budget", type=int, default=None)
    p.add_argument("--target-modules", default=None, help="comma-separated names (default: all projections)")
    a = p.parse_args(argv)
    import torch
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import MoLoRAConfig, allocation_table
    from .assets import PACKAGED_MODELS, load_model_and_tokenizer

    if a.model in PACKAGED_MODELS:
        model = load_model_and_tokenizer(a.model)[0]
    else:
        try:
            cfg = AutoConfig.from_pretrained(a.model, local_files_only=True)
        except OSError as e:
            print(f"molora allocation: error: cannot find model {a.model!r} locally ({e}); packaged models: "
                  f"{', '.join(PACKAGED_MODELS)}", file=sys.stderr)
            return 2
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    from ..allocation import AllocationError
    from ..tuner.compat import peft_wrap

    targets = a.target_modules.split(",") if a.target_modules else None
    try:
        mcfg = MoLoRAConfig(num_experts=_cli_spec(a.num_experts), top_k=_cli_spec(a.top_k), r=_cli_spec(a.r),
                            expert_budget=a.expert_budget, target_modules=targets)
        with init_empty_weights():
            peft_model = peft_wrap(lambda: get_peft_model(model, mcfg), model)
    except (AllocationError, ValueError) as e:
        print(f"molora allocation: error: {e}", file=sys.stderr)
        return 2
    print(allocation_table(peft_model))
    return 0


def _allocate(argv: Sequence[str]) -> int:
    from ..allocation.methods import METHODS, method_names
    from .recipe import RecipeError, load_recipe, parse_overrides

    p = argparse.ArgumentParser(
        prog="molora allocate",
        description="Data-driven expert allocation: per-layer scores of a method on the recipe's model (and "
                    "training rows), mapped to experts per layer with E_l ∝ score^beta. Methods: "
                    + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    p.add_argument("recipe", help="a recipe (its model, data, target_modules and r are used)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(method_names())}")
    p.add_argument("--budget", type=int, required=True, help="total experts over all layers")
    p.add_argument("--groups", type=int, default=None, help="average the scores over G contiguous groups first")
    p.add_argument("--min", type=int, default=None, dest="min_experts", help="experts per layer, at least "
                                                                              "(default: top_k, or 1)")
    p.add_argument("--max", type=int, default=None, dest="max_experts", help="experts per layer, at most")
    p.add_argument("--beta", type=float, default=None, help="exponent of the score (default: the method's)")
    p.add_argument("--calib-examples", type=int, default=64, help="training rows read by data-driven methods")
    p.add_argument("--write", default=None, help="write the YAML allocation fragment to this file")
    p.add_argument("--out", default=None, help="folder for the table, JSON and PNG (default: "
                                               "<train.output_dir>/allocation)")
    a, rest = p.parse_known_args(argv)
    try:
        from ..allocation.methods import get_method

        method = get_method(a.method)
        recipe = load_recipe(a.recipe, parse_overrides(rest))
        if a.calib_examples < 1:
            raise RecipeError(f"--calib-examples={a.calib_examples} must be >= 1")
    except (RecipeError, ValueError) as e:
        print(f"molora allocate: error: {e}", file=sys.stderr)
        return 2
    from .recipe import model_num_layers

    layers = model_num_layers(recipe.model.name_or_path)
    if layers is not None and a.budget < layers:
        print(f"molora allocate: error: --budget={a.budget} is below one expert per layer "
              f"({recipe.model.name_or_path}: {layers} layers)", file=sys.stderr)
        return 2
    return _run_allocate(a, method, recipe)


def _run_allocate(a, method, recipe) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..allocation.auto import layer_params, result_table, yaml_fragment
    from .allocate import allocate_for_recipe
    from ..allocation.mapping import MappingError
    from .common import load_base_model, load_recipe_rows as _load_rows, write_json_atomic as _write_json_atomic

    out = Path(a.out) if a.out else Path(recipe.train.output_dir) / "allocation"
    try:
        train_rows, _, _ = _load_rows(recipe, Path(recipe.train.output_dir), is_main=True)
        model, tokenizer = load_base_model(recipe)
        al = recipe.allocation
        res = allocate_for_recipe(recipe, model, tokenizer, train_rows, method.name, a.budget, beta=a.beta,
                                  min_experts=a.min_experts, max_experts=a.max_experts, groups=a.groups,
                                  calib_examples=a.calib_examples)
        targets = al.target_modules if isinstance(al.target_modules, list) else None
    except (MappingError, ValueError) as e:
        print(f"molora allocate: error: {e}", file=sys.stderr)
        return 2
    ranks = al.r if isinstance(al.r, int) else [x.r for x in _resolve_ranks(al.r, len(res.experts))]
    params = layer_params(model, res.experts, ranks, targets, experts_mlp=res.experts_mlp)
    table = result_table(res, params)
    print(table)
    frag = yaml_fragment(res, recipe.model.name_or_path)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{res.method}-budget{res.budget}"
    (out / f"{stem}.txt").write_text(table + "\n", encoding="utf-8")
    _write_json_atomic(out / f"{stem}.json", {**res.to_dict(), "params": params,
                                              "model": recipe.model.name_or_path, "recipe": str(a.recipe)})
    png = _plot_allocation(res, out / f"{stem}.png")
    if a.write:
        Path(a.write).write_text(frag, encoding="utf-8")
    print("\n" + frag if not a.write else "", end="")
    print(f"molora allocate: wrote {out / (stem + '.json')}" + (f", {png}" if png else "")
          + (f", {a.write}" if a.write else ""))
    return 0


def _resolve_ranks(r, num_layers: int):
    from ..allocation.specs import resolve_allocation

    return resolve_allocation(1, 1, r, num_layers)


def _plot_allocation(res, path: Path):
    """Score and experts per layer (two panels); returns the path or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    layers = list(range(len(res.scores)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    if res.experts_mlp is None:
        ax1.plot(layers, res.scores, marker="o")
        ax2.bar(layers, res.experts)
    else:  # attention and MLP side by side
        ax1.plot(layers, res.scores, marker="o", label="attention")
        ax1.plot(layers, res.scores_mlp, marker="s", label="MLP")
        ax1.legend(fontsize=8)
        ax2.bar([x - 0.2 for x in layers], res.experts, width=0.4, label="attention")
        ax2.bar([x + 0.2 for x in layers], res.experts_mlp, width=0.4, label="MLP")
        ax2.legend(fontsize=8)
    ax1.set_ylabel(f"{res.method} score")
    ax1.set_title(f"{res.method}: budget {res.budget}, E ∝ score^{res.beta:g}")
    ax2.set_ylabel("experts")
    ax2.set_xlabel("layer")
    fig.tight_layout()
    from .report import save_figure

    save_figure(fig, path)
    return path


def _bench(argv: Sequence[str]) -> int:
    names = {"kernels": "bench_kernels.py", "train": "bench_train.py", "generate": "bench_generate.py",
             "eval": "bench_eval.py"}
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: molora bench {{{'|'.join(names)}}} [options]  (molora bench NAME --help for its options)")
        return 0
    if not argv or argv[0] not in names:
        print(f"usage: molora bench {{{'|'.join(names)}}} [options]  (--help for the benchmark's options)",
              file=sys.stderr)
        return 2
    script = Path(__file__).resolve().parents[2] / "benchmarks" / names[argv[0]]
    if not script.exists():
        print(f"molora bench: {script} not found; benchmarks ship with the source repository "
              f"(pip install -e . from a clone)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


@dataclass(frozen=True)
class Command:
    """One ``molora`` command: its help line and its entry, ``"module:function"`` (imported when the command
    runs, so ``molora --help`` and recipe checks import no torch) or a function of this module."""

    help: str
    entry: object

    def run(self, argv: list[str]) -> Optional[int]:
        fn = self.entry
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module, __package__), attr)
        return fn(argv)


#: every command, in the order ``molora --help`` lists them (one table: adding a command is one entry)
COMMANDS: dict[str, Command] = {
    "train": Command("fine-tune from a YAML recipe", ".train:main"),
    "eval": Command("accuracy of a saved adapter (or the untuned model) under a recipe", ".eval_run:main"),
    "report": Command("render loss curves and the expert-load heatmap of a run", ".report:main"),
    "bench": Command("run a benchmark (kernels | train | generate | eval)", _bench),
    "convert-mola": Command("import a checkpoint of the original MoLA code", _convert),
    "allocation": Command("print the resolved per-layer allocation for a model", _allocation),
    "allocate": Command("data-driven allocation: per-layer scores -> experts per layer (table, PNG, YAML)",
                        _allocate),
    "sweep": Command("equal-budget allocation study: one training run per allocation x seed, merged table",
                     ".sweep:main"),
    "merge-experts": Command("fewer experts per layer after training (exact where unused, else lossy and measured)",
                             ".merge_cmd:main"),
    "lm-eval": Command("lm-evaluation-harness with molora adapters (and local tasks from molora JSONL files)",
                       ".lm_eval_cmd:main"),
    "split": Command("carve disjoint validation/test slices out of a data file (seeded, recorded)", ".split_cmd:main"),
    "generate": Command("completions of prompts (or a JSONL file) with a tuned model and its recipe's template",
                        ".generate_cmd:main_generate"),
    "chat": Command("an interactive chat with a tuned chat model", ".generate_cmd:main_chat"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed --module molora train RECIPE` runs `python -m molora --local_rank=N train RECIPE`: the launcher puts
    # its flag before the command, so move it behind the command (molora train reads it there)
    launcher = []
    while argv and (argv[0].startswith("--local_rank") or argv[0].startswith("--local-rank")):
        flag = argv.pop(0)
        launcher.append(flag)
        if "=" not in flag and argv:
            launcher.append(argv.pop(0))
    if launcher and argv:
        argv = [argv[0], *launcher, *argv[1:]]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: molora COMMAND [args]\n\ncommands:")
        for c, cmd in COMMANDS.items():
            print(f"  {c:<14}{cmd.help}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"molora: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return cmd.run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
