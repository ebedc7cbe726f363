"""Generation (inference) speed: molora (MoLA ▽) vs PEFT LoRA of the same per-expert rank, greedy decoding.

Serving is where a mixture costs most relative to LoRA: a decode step runs every projection on a handful of
tokens, so the fixed cost of each MoLoRA module (router GEMM, softmax/top-k, the routing statistics the tuner
records for ``router_summary``) weighs more than in training, and routed layers cannot be merged into the base
weight. One call = ``model.generate`` of ``--new-tokens`` tokens (greedy, KV cache, no early stop) for a batch
of ``--batch`` prompts of ``--prompt`` tokens. Variants (same target modules, eval mode, no dropout):

* ``frozen``          the base model with no adapter: the floor;
* ``lora-r{r}``       PEFT LoRA of rank r, unmerged (the target to match);
* ``lora-r{r} merged`` the same LoRA folded into the base weights (what a LoRA user serves): the floor again;
* ``molora-▽``        molora, ``num_experts="2,4,6,8"``, ``top_k=2``, rank r (MoLA's best shape), as it serves by
  default: the inference path (routing resolved once per module, no autograd Function, no statistics);
* ``molora-▽ +stats``  the same asked to record the routing statistics in every forward
  (``model.base_model.record_router_stats = True``, to read ``router_summary``): the training path.

Timed alternated in one run (benchmarks/common.py); the table gives the median time per call, generated
tokens/s and the ratio to unmerged LoRA. ``--compile`` adds a second table: one no-grad forward over the prompts
(prefill: fixed shapes) of unmerged LoRA and ``molora-▽``, eager and ``torch.compile(model, fullgraph=True)`` with
inductor (compiling takes minutes on CPU; ``generate`` itself is not compiled, its growing KV cache would
recompile every step). Default model: the packaged SmolLM2-135M (real weights); ``--random``
builds a random model of the same shape; ``--tiny`` a 4-layer random model for smoke tests.

    python benchmarks/bench_generate.py [--random|--tiny] [--batch 4] [--prompt 64] [--new-tokens 32] [--reps 5]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import TARGETS, build_base  # noqa: E402
from common import (add_output_args, environment, format_table, output_dir, plot_ratio_bars,  # noqa: E402
                    ratio_results, time_alternating, write_json)


def build_tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))


def build_variants(base, r: int, backend: str) -> dict[str, torch.nn.Module]:
    import molora
    from peft import LoraConfig, get_peft_model

    out = {"frozen": copy.deepcopy(base)}
    lora_cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    out[f"lora-r{r}"] = get_peft_model(copy.deepcopy(base), lora_cfg)
    out[f"lora-r{r} merged"] = get_peft_model(copy.deepcopy(base), lora_cfg).merge_and_unload()
    cfg = molora.MoLoRAConfig(num_experts="2,4,6,8", top_k=2, r=r, lora_alpha=2 * r, target_modules=TARGETS,
                              backend=backend, init_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
    out["molora-▽"] = get_peft_model(copy.deepcopy(base), cfg)
    stats = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    stats.base_model.record_router_stats = True
    out["molora-▽ +stats"] = stats
    for m in out.values():
        m.eval()
    return out


def make_generate(model, ids, mask, new_tokens: int):
    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new_tokens
    return run


def compile_table(models: dict, lora: str, ids, mask, a) -> list[dict]:
    """Prefill forward (no grad) of ``lora`` and ``molora-▽``, eager vs ``torch.compile(fullgraph=True)``."""
    import time

    def forward(m):
        def run():
            with torch.no_grad():
                m(input_ids=ids, attention_mask=mask)
        return run

    calls, compile_s = {}, {}
    for name in (lora, "molora-▽"):
        calls[f"{name} eager"] = forward(models[name])
        c = torch.compile(models[name], fullgraph=True)
        t = time.perf_counter()
        forward(c)()  # compile
        compile_s[name] = time.perf_counter() - t
        calls[f"{name} compiled"] = forward(c)
    timing = time_alternating(calls, warmup=a.warmup, reps=max(a.reps, 5), device=ids.device)
    rows = ratio_results(timing, f"{lora} eager", ids.numel())
    for r in rows:
        r["ratio_to_lora_eager"] = r.pop("ratio_to_lora")
        r["compile_s"] = compile_s[r["variant"].rsplit(" ", 1)[0]] if r["variant"].endswith("compiled") else None
    print(f"\nPrefill forward, batch {ids.shape[0]} x {ids.shape[1]} tokens, no grad, inductor, median of "
          f"{int(timing[f'{lora} eager']['n'])} alternated reps")
    print(format_table(["variant", "ms/call", "tokens/s", "x LoRA eager", "compile s"],
                       [[r["variant"], r["median_s"] * 1e3, r["tokens_per_s"], r["ratio_to_lora_eager"],
                         r["compile_s"]] for r in rows]))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--random", action="store_true", help="random weights of the SmolLM2-135M shape")
    size.add_argument("--tiny", action="store_true", help="a 4-layer random model (smoke test)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time a prefill forward, eager vs torch.compile")
    add_output_args(p, "bench_generate")
    a = p.parse_args(argv)
    for name in ("batch", "prompt", "new_tokens", "r", "reps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = (build_tiny() if a.tiny else build_base(a.random, a.model)).to(device)
    models = build_variants(base, a.r, a.backend)
    del base
    g = torch.Generator().manual_seed(0)
    vocab = models["frozen"].config.vocab_size
    ids = torch.randint(1, vocab, (a.batch, a.prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    calls = {name: make_generate(m, ids, mask, a.new_tokens) for name, m in models.items()}
    timing = time_alternating(calls, warmup=a.warmup, reps=a.reps, device=device)
    results = ratio_results(timing, f"lora-r{a.r}", a.batch * a.new_tokens, rate_key="new_tokens_per_s")
    rows = [[r["variant"], r["median_s"] * 1e3, r["new_tokens_per_s"], r["ratio_to_lora"]] for r in results]
    model_desc = "tiny random Llama" if a.tiny else ("random SmolLM2-135M shape" if a.random else a.model)
    print(f"\nGreedy generation, {model_desc}, batch {a.batch}, prompt {a.prompt} + {a.new_tokens} new tokens, fp32, "
          f"{device}, {torch.get_num_threads()} threads, median of {int(timing['frozen']['n'])} alternated reps")
    print(format_table(["variant", "ms/call", "new tokens/s", "x LoRA"], rows))
    compiled = compile_table(models, f"lora-r{a.r}", ids, mask, a) if a.compile else None
    out = output_dir(a)
    payload = {"benchmark": "generate", "model": model_desc, "batch": a.batch, "prompt": a.prompt,
               "new_tokens": a.new_tokens, "r": a.r, "device": str(device), "environment": environment(),
               "results": results, "compile": compiled}
    jpath = write_json(out / "bench_generate.json", payload)
    ppath = plot_ratio_bars(out / "bench_generate.png", [model_desc],
                            {r["variant"]: [r["ratio_to_lora"]] for r in results},
                            title="Generation time / PEFT LoRA, unmerged (lower is better)", ylabel="ratio to LoRA")
    print(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
    return payload


if __name__ == "__main__":
    main()
