"""End-to-end training step: molora (MoLA ▽ allocation) vs PEFT LoRA of the same per-expert rank.

One step = forward, backward, AdamW update, on a causal LM with the same target modules for every variant:

* ``frozen``     the base model with no adapter (forward + backward to the inputs): the floor;
* ``lora-r{r}``  PEFT LoRA of rank r (the target to match);
* ``molora-▽``   molora with ``num_experts="2,4,6,8"``, ``top_k=2``, rank r (MoLA's best shape);
* ``molora-□``   molora with 5 experts everywhere (same total experts as ▽);
* ``molora-▽ per-module`` ▽ with ``share_sibling_shrink=False``: every projection its own shrink GEMM and its
  own dropout mask (the default shares one shrink GEMM and one mask among q/k/v and among gate/up).

Every variant uses the same ``lora_dropout`` (``--dropout``, default 0.05: the recipes' setting; PEFT LoRA then
draws one mask per projection, as it does in training).

Variants are timed alternated in one run (benchmarks/common.py); the table gives the median step time,
tokens/s and the ratio to LoRA, plus the activation memory one step saves for backward (bytes of the
tensors autograd keeps, measured with saved-tensor hooks: the same on any device) and, on CUDA, the peak
allocated memory. Default model: the packaged SmolLM2-135M (real weights); ``--random`` builds a random
model of the same shape (no packages needed).

    python benchmarks/bench_train.py [--random] [--batch 4] [--seq 128] [--dropout 0.05] [--reps 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_output_args, environment, format_table, output_dir, plot_ratio_bars,  # noqa: E402
                    ratio_results, time_alternating, write_json)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(random_init: bool, model_name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if random_init:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    from molora.run.assets import load_model_and_tokenizer

    return load_model_and_tokenizer(model_name)[0]


def build_variants(base, r: int, backend: str, dropout: float = 0.05) -> dict[str, torch.nn.Module]:
    import molora
    from peft import LoraConfig, get_peft_model

    out = {}
    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()
    out["frozen"] = frozen
    out[f"lora-r{r}"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                                         target_modules=TARGETS))
    for name, spec, share in (("molora-▽", "2,4,6,8", True), ("molora-□", 5, True),
                              ("molora-▽ per-module", "2,4,6,8", False)):
        cfg = molora.MoLoRAConfig(num_experts=spec, top_k=2, r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                  backend=backend, init_weights=False, lora_dropout=dropout,
                                  share_sibling_shrink=share)
        out[name] = get_peft_model(copy.deepcopy(base), cfg)
    for m in out.values():
        m.train()
    return out


def make_step(model, batch, optimizer: Optional[torch.optim.Optimizer]):
    def step():
        out = model(**batch)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd saves for backward during one forward (deduplicated by storage)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", action="store_true", help="random weights of the SmolLM2-135M shape")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout of every variant (recipes: 0.05)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_output_args(p, "bench_train")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = build_base(a.random, a.model).to(device)
    models = build_variants(base, a.r, a.backend, a.dropout)
    del base
    g = torch.Generator().manual_seed(0)
    vocab = models["frozen"].config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps, trainable = {}, {}
    for name, m in models.items():
        params = [p for p in m.parameters() if p.requires_grad]
        trainable[name] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        steps[name] = make_step(m, batch, opt)
    act = {name: saved_activation_bytes(m, batch) for name, m in models.items()}
    peak = {}
    if device.type == "cuda":
        for name, fn in steps.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            peak[name] = torch.cuda.max_memory_allocated()
    timing = time_alternating(steps, warmup=a.warmup, reps=a.reps, device=device)
    results = ratio_results(timing, f"lora-r{a.r}", a.batch * a.seq)
    rows = []
    for res in results:
        name = res["variant"]
        res.update(trainable_params=trainable[name], saved_activation_mib=act[name] / 2**20,
                   peak_mem_mib=peak.get(name, 0) / 2**20 if peak else None)
        rows.append([name, res["median_s"] * 1e3, res["tokens_per_s"], res["ratio_to_lora"], f"{trainable[name]:,}",
                     res["saved_activation_mib"]])
    model_desc = "random SmolLM2-135M shape" if a.random else a.model
    print(f"\nTraining step (fwd+bwd+AdamW), {model_desc}, {a.batch}x{a.seq} tokens, lora_dropout {a.dropout}, fp32, "
          f"{device}, "
          f"{torch.get_num_threads()} threads, median of {int(timing['frozen']['n'])} alternated reps")
    print(format_table(["variant", "ms/step", "tokens/s", "x LoRA", "trainable", "saved act. MiB"], rows))
    out = output_dir(a)
    payload = {"benchmark": "train_step", "model": model_desc, "batch": a.batch, "seq": a.seq, "r": a.r,
               "lora_dropout": a.dropout,
               "device": str(device), "environment": environment(), "results": results}
    jpath = write_json(out / "bench_train.json", payload)
    ppath = plot_ratio_bars(out / "bench_train.png", [model_desc], {r["variant"]: [r["ratio_to_lora"]] for r in results},
                            title="Training step time / PEFT LoRA (lower is better)", ylabel="ratio to LoRA")
    print(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
    return payload


if __name__ == "__main__":
    main()
