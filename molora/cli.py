"""The ``molora`` command line.

    molora train RECIPE.yaml [--key value ...]        fine-tune from a YAML recipe (see recipes/)
    molora report OUTPUT_DIR                          loss curves and expert-load heatmap as PNG
    molora bench kernels|train [options]              benchmarks (JSON + PNG + table)
    molora convert-mola SRC DST --num-experts 2,4,6,8 --top-k 2
    molora allocation MODEL --num-experts ▽ --top-k 2 --r 8   print the resolved per-layer table
"""
from __future__ import annotations

import argparse
import runpy
import sys
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
    from .allocation import AllocationError
    from .convert import ConversionError, convert_mola

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

    from . import MoLoRAConfig, allocation_table
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
    from .allocation import AllocationError
    from .compat import peft_wrap

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


def _bench(argv: Sequence[str]) -> int:
    names = {"kernels": "bench_kernels.py", "train": "bench_train.py"}
    if not argv or argv[0] not in names:
        print(f"usage: molora bench {{{'|'.join(names)}}} [options]  (--help for the benchmark's options)",
              file=sys.stderr)
        return 2
    script = Path(__file__).resolve().parent.parent / "benchmarks" / names[argv[0]]
    if not script.exists():
        print(f"molora bench: {script} not found; benchmarks ship with the source repository "
              f"(pip install -e . from a clone)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": "fine-tune from a YAML recipe",
        "eval": "accuracy of a saved adapter (or the untuned model) under a recipe",
        "report": "render loss curves and the expert-load heatmap of a run",
        "bench": "run a benchmark (kernels | train)",
        "convert-mola": "import a checkpoint of the original MoLA code",
        "allocation": "print the resolved per-layer allocation for a model",
    }
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: molora COMMAND [args]\n\ncommands:")
        for c, h in commands.items():
            print(f"  {c:<14}{h}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .train import main as train_main

        return train_main(rest) or 0
    if cmd == "eval":
        from .eval_run import main as eval_main

        return eval_main(rest) or 0
    if cmd == "report":
        from .report import main as report_main

        return report_main(rest) or 0
    if cmd == "bench":
        return _bench(rest)
    if cmd == "convert-mola":
        return _convert(rest)
    if cmd == "allocation":
        return _allocation(rest)
    print(f"molora: unknown command {cmd!r}; commands: {', '.join(commands)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
