"""Prepared GPU check: the Triton kernels compiled and checked, one layer timed at LLaMA-2-7B shapes, a bf16
training step of a ~1 B-parameter LLaMA-like model, molora ▽ against PEFT LoRA. One JSON + one PNG.

Run it with ``bash benchmarks/gpu_check.sh`` on a machine with one NVIDIA GPU and torch, transformers, triton and
peft installed (under 8 minutes on an H100/H200). Sections:

1. ``correctness``: ``moe_lora(backend="triton")`` (compiled) against the fp32 reference (``backend="reference"``)
   on fresh random inputs, outputs and the gradients of x, A, B and the router, in fp32 / bf16 / fp16, for a few
   (T, d, E, k, r) including awkward sizes. Error = max |got - ref| / max |ref| per tensor; tolerances 1e-4 (fp32;
   TF32 is off), 3e-2 (bf16), 5e-3 (fp16).
2. ``layer``: one MoLoRA linear, forward + backward, d = 4096, T = 4096 and 16384 tokens, E 8 k 2 r 8, bf16:
   the frozen floor, PEFT LoRA r8, the per-expert loop (MixLoRA/MoLA style) and molora's triton, torch and sparse
   backends, timed with CUDA events (median of the repetitions, after warm-up), as ratios to PEFT LoRA r8.
3. ``train``: a random LLaMA-like model (hidden 2048, 16 layers, ~1.0 B parameters) in bf16, all seven
   projections adapted: MoLA ▽ (2,4,6,8 over the layers, top-2, r 8, dropout 0.05) against PEFT LoRA r8 (same
   targets, dropout 0.05), AdamW on the adapter, 4 x 1024 tokens per step; median step time and peak memory.
4. ``decode``: one adapted linear (d 4096, bf16, no grad) at batch 1 and 32 tokens -- frozen, PEFT LoRA r8, molora
   E 8 k 2 r 8 -- eager and replayed from a CUDA graph (a failed capture is recorded with its reason: a host sync or
   a data-dependent shape in the module), and greedy generation of 32 tokens with the ~1 B model at batch 1 and 32,
   molora ▽ against PEFT LoRA r8 (router statistics off, as inference should run).

``--tiny`` runs every section at toy sizes on whatever device there is (on CPU the Triton kernels run under
``TRITON_INTERPRET=1``, which the shell script sets): CI runs it so that the script stays runnable.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
for extra in (_HERE.parent / "kernels", _HERE.parent):  # a checkout without an install works too
    if str(extra) not in sys.path:
        sys.path.append(str(extra))

from common import add_output_args, output_dir, environment, format_table, write_json  # noqa: E402

TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- timing
def time_events(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, reps: int,
                setup: Optional[Callable[[], None]] = None) -> dict[str, dict[str, float]]:
    """Median/min seconds per call of each function, alternated A B C A B C; CUDA events on a GPU (the GPU time of
    the call), ``perf_counter`` around a synchronised call elsewhere."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            if setup:
                setup()
            fns[n]()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    for i in range(reps):
        for n in names[i % len(names):] + names[: i % len(names)]:
            if setup:
                setup()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                end.synchronize()
                times[n].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(v), "min": min(v), "n": len(v)} for n, v in times.items()}


# ----------------------------------------------------------------------------------------------- 1. correctness
def check_correctness(device: torch.device, tiny: bool) -> list[dict[str, Any]]:
    """Correctness does not need the fastest config: one config per kernel (autotuning every shape x dtype compiled
    5 configs x 5 kernels each time, which took minutes per case on the first H200 run)."""
    from molora_kernels import moe_lora
    from molora_kernels.triton_routing import single_config

    with single_config():
        return _check_correctness(moe_lora, device, tiny)


def _check_correctness(moe_lora, device: torch.device, tiny: bool) -> list[dict[str, Any]]:

    shapes = [(37, 48, 4, 2, 4), (64, 32, 3, 3, 2)] if tiny else [(300, 256, 8, 2, 8), (1000, 512, 4, 1, 16),
                                                                  (4096, 1024, 8, 2, 8)]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for (t, d, e, k, r) in shapes:
            g = torch.Generator().manual_seed(t * 7 + d + e)
            mk = lambda *s, sd=0.1: (torch.randn(*s, generator=g) * sd)  # noqa: E731
            x0, a0, b0, w0 = mk(t, d, sd=1.0), mk(e * r, d), mk(d, e * r), mk(e, d)
            dy = mk(t, d, sd=1.0).to(device=device, dtype=dtype)
            grads = {}
            for backend in ("reference", "triton"):
                x = x0.to(device=device, dtype=dtype).requires_grad_(True)
                a, b, w = (p.to(device=device, dtype=dtype).requires_grad_(True) for p in (a0, b0, w0))
                out = moe_lora(x, a, b, w, top_k=k, scaling=2.0, backend=backend)
                out.delta.backward(dy)
                grads[backend] = {"y": out.delta.detach().float(), "x": x.grad.float(), "A": a.grad.float(),
                                  "B": b.grad.float(), "router": w.grad.float()}
            errs = {n: float((grads["triton"][n] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                    for n, ref in grads["reference"].items()}
            worst = max(errs.values())
            rows.append({"dtype": dtype_name, "T": t, "d": d, "E": e, "k": k, "r": r, "errors": errs,
                         "max_error": worst, "tolerance": TOLERANCE[dtype_name], "ok": worst <= TOLERANCE[dtype_name]})
            print(f"  correctness {dtype_name} T={t} d={d} E={e} k={k} r={r}: max rel error {worst:.2e} "
                  f"({'ok' if rows[-1]['ok'] else 'FAIL'})", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- 2. layer
def time_layer(device: torch.device, tiny: bool, reps: int) -> list[dict[str, Any]]:
    from bench_kernels import build_point
    from molora_kernels import available_backends

    points = [(64, 64)] if tiny else [(4096, 4096), (16384, 4096)]
    dtype = torch.float32 if (tiny and device.type == "cpu") else torch.bfloat16
    backends = [b for b in ("triton", "torch", "sparse") if b in available_backends(device)]
    keep = ["frozen", "peft-r", "loop", *(f"molora/{b}" for b in backends)]
    rows = []
    for t, d in points:
        variants, params, x = build_point(t, d, 8, 2, 8, dtype, device, backends, with_loop=True,
                                          with_fused_base=False)
        x.requires_grad_(True)
        dy = torch.randn(t, d, device=device, dtype=dtype)
        fns = {n: (lambda f: lambda: f().backward(dy))(variants[n]) for n in keep if n in variants}

        def setup():
            x.grad = None
            for p in params:
                p.grad = None

        res = time_events(fns, device, warmup=1 if tiny else 3, reps=reps, setup=setup)
        ref = res.get("peft-r", res["frozen"])["median"]
        row = {"T": t, "d": d, "E": 8, "k": 2, "r": 8, "dtype": str(dtype).replace("torch.", ""), "mode": "fwdbwd",
               "ms": {n: v["median"] * 1e3 for n, v in res.items()},
               "ratio_to_peft_r8": {n: v["median"] / ref for n, v in res.items()}}
        rows.append(row)
        print(f"  layer T={t} d={d}: " + "  ".join(f"{n} {v:.2f} ms" for n, v in row["ms"].items()), flush=True)
        del variants, params, x, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------- 3. train step
def _llama(tiny: bool, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if tiny:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.requires_grad_(False)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def time_train_step(device: torch.device, tiny: bool, reps: int) -> list[dict[str, Any]]:
    import molora
    from peft import LoraConfig, get_peft_model

    dtype = torch.float32 if (tiny and device.type == "cpu") else torch.bfloat16
    batch, seq = (2, 32) if tiny else (4, 1024)
    configs = {
        "peft-lora-r8": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS),
        "molora-▽": molora.MoLoRAConfig(num_experts="2,4,6,8", top_k=2, r=8, lora_alpha=16, lora_dropout=0.05,
                                         target_modules=TARGETS),
    }
    rows = []
    for name, cfg in configs.items():
        model = get_peft_model(_llama(tiny, dtype, device), cfg)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        res = time_events({name: step}, device, warmup=2, reps=reps)[name]
        total = sum(p.numel() for p in model.parameters())
        row = {"variant": name, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "seq": seq,
               "params_total": total, "params_trainable": sum(p.numel() for p in params),
               "step_ms": res["median"] * 1e3, "step_ms_min": res["min"] * 1e3,
               "tokens_per_s": batch * seq / res["median"],
               "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30) if device.type == "cuda" else None}
        rows.append(row)
        print(f"  train {name}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
              f"{total / 1e9:.2f} B params ({row['params_trainable'] / 1e6:.1f} M trainable), "
              f"peak {row['peak_mem_gib'] if row['peak_mem_gib'] is None else round(row['peak_mem_gib'], 1)} GiB",
              flush=True)
        del model, opt, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["step_ms"]
    for r in rows:
        r["ratio_to_peft_r8"] = r["step_ms"] / base
    return rows


# ----------------------------------------------------------------------------------------------- 4. decode
def _decode_layer_fns(layer: nn.Module, x: torch.Tensor, graphs: bool) -> tuple[Callable[[], Any], Optional[str]]:
    """A no-grad forward of ``layer`` on ``x``; with ``graphs`` the forward captured in a CUDA graph and replayed
    (None and the reason when capture fails: a host sync or a data-dependent shape inside the module)."""
    def eager():
        with torch.no_grad():
            return layer(x)

    if not graphs:
        return eager, None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                eager()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        return graph.replay, None
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return eager, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def time_decode(device: torch.device, tiny: bool, reps: int) -> dict[str, Any]:
    """Decode: (a) one adapted linear at d 4096 (bf16, no grad) for batch 1 and 32 tokens: frozen, PEFT LoRA r8,
    molora E 8 k 2 r 8 (torch backend, no router statistics) eager and replayed from a CUDA graph; (b) greedy
    generation of 32 tokens with the ~1 B LLaMA-like model (batch 1 and 32): molora ▽ against PEFT LoRA r8."""
    import molora
    from peft import LoraConfig, get_peft_model

    dtype = torch.float32 if (tiny and device.type == "cpu") else torch.bfloat16
    d = 64 if tiny else 4096
    graphs = device.type == "cuda"
    rows = []
    for batch in (1, 32):
        base = nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(batch, 1, d, device=device, dtype=dtype)
        variants: dict[str, nn.Module] = {"frozen": base}
        lora = get_peft_model(nn.Sequential(nn.Linear(d, d, bias=False)).to(device, dtype),
                              LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
        mol = get_peft_model(nn.Sequential(nn.Linear(d, d, bias=False)).to(device, dtype),
                             molora.MoLoRAConfig(num_experts=8, top_k=2, r=8, target_modules=["0"], backend="torch",
                                                 init_weights=False))
        mol.base_model.record_router_stats = False
        variants["peft-lora-r8"], variants["molora-E8k2"] = lora.eval(), mol.eval()
        fns, notes = {}, {}
        for name, mod in variants.items():
            fns[name], _ = _decode_layer_fns(mod, x, graphs=False)
            if graphs:
                fn, why = _decode_layer_fns(mod, x, graphs=True)
                if why is None:
                    fns[name + " (graph)"] = fn
                else:
                    notes[name] = why
        res = time_events(fns, device, warmup=2, reps=reps)
        ref = res["peft-lora-r8"]["median"]
        rows.append({"kind": "layer", "batch": batch, "d": d, "dtype": str(dtype).replace("torch.", ""),
                     "us": {n: v["median"] * 1e6 for n, v in res.items()},
                     "ratio_to_peft_r8": {n: v["median"] / ref for n, v in res.items()},
                     "graph_capture_failed": notes})
        print(f"  decode layer batch {batch}: " + "  ".join(f"{n} {v['median'] * 1e6:.1f} us" for n, v in res.items())
              + (f"  (no CUDA graph: {notes})" if notes else ""), flush=True)
    new_tokens = 4 if tiny else 32
    for batch in (1, 32):
        times = {}
        for name, cfg in (("peft-lora-r8", LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)),
                          ("molora-▽", molora.MoLoRAConfig(num_experts="2,4,6,8", top_k=2, r=8, lora_alpha=16,
                                                           target_modules=TARGETS, init_weights=False))):
            model = get_peft_model(_llama(tiny, dtype, device), cfg).eval()
            if name.startswith("molora"):
                model.base_model.record_router_stats = False
            ids = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)

            def gen(model=model, ids=ids):
                with torch.no_grad():
                    model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)

            times[name] = time_events({name: gen}, device, warmup=1, reps=max(2, reps // 5))[name]["median"]
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = {"kind": "generate", "batch": batch, "new_tokens": new_tokens,
               "ms_per_token": {n: t / new_tokens * 1e3 for n, t in times.items()},
               "ratio_to_peft_r8": {n: t / times["peft-lora-r8"] for n, t in times.items()}}
        rows.append(row)
        print(f"  generate batch {batch}: " + "  ".join(f"{n} {v:.2f} ms/token" for n, v in
                                                      row["ms_per_token"].items())
              + f"  (molora / LoRA {row['ratio_to_peft_r8']['molora-▽']:.2f}x)", flush=True)
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------- report
def _plot(path: Path, layer: list[dict], train: list[dict]) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed: no PNG)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(layer[0]["ratio_to_peft_r8"]) if layer else []
    width = 0.8 / max(len(layer), 1)
    for i, row in enumerate(layer):
        axes[0].bar([j + i * width for j in range(len(names))], [row["ratio_to_peft_r8"][n] for n in names],
                    width, label=f"T={row['T']}")
    axes[0].set_xticks([j + width * (len(layer) - 1) / 2 for j in range(len(names))], names, rotation=30,
                       ha="right")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_ylabel("fwd+bwd time / PEFT LoRA r8")
    axes[0].set_title("one layer, d 4096, E 8 k 2 r 8")
    axes[0].legend()
    axes[1].bar([r["variant"] for r in train], [r["step_ms"] for r in train], color=["#888", "#3a7"])
    axes[1].set_ylabel("ms per training step")
    axes[1].set_title("bf16 step, ~1 B LLaMA-like")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes on any device (CI keeps the script runnable)")
    add_output_args(p, "gpu_check")
    p.add_argument("--sections", default="correctness,layer,train,decode", help="comma-separated subset to run")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; 3 with --tiny)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.tiny:
        print("gpu_check: no CUDA device; run with --tiny for the CPU smoke version", file=sys.stderr)
        return 2
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"correctness", "layer", "train", "decode"})
    if unknown:
        print(f"gpu_check: unknown section(s) {unknown}; known: correctness, layer, train, decode", file=sys.stderr)
        return 2
    reps = a.reps or (3 if a.tiny else 20)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "gpu_check", "tiny": a.tiny, "environment": environment(),
                              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    print(f"gpu_check on {result['device']} (torch {torch.__version__})", flush=True)
    if "correctness" in sections:
        result["correctness"] = check_correctness(device, a.tiny)
    if "layer" in sections:
        result["layer"] = time_layer(device, a.tiny, reps)
    if "train" in sections:
        result["train"] = time_train_step(device, a.tiny, reps)
    if "decode" in sections:
        result["decode"] = time_decode(device, a.tiny, reps)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = output_dir(a)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", result)
    png = _plot(out / "gpu_check.png", result.get("layer", []), result.get("train", []))
    if result.get("layer"):
        names = list(result["layer"][0]["ms"])
        print(format_table(["T", *names], [[r["T"], *(f"{r['ms'][n]:.2f} ms ({r['ratio_to_peft_r8'][n]:.2f}x)"
                                                      for n in names)] for r in result["layer"]]))
    if result.get("train"):
        print(format_table(["variant", "ms/step", "x PEFT r8", "tokens/s", "peak GiB"],
                           [[r["variant"], f"{r['step_ms']:.1f}", f"{r['ratio_to_peft_r8']:.2f}",
                             f"{r['tokens_per_s']:.0f}", r["peak_mem_gib"] and f"{r['peak_mem_gib']:.1f}"]
                            for r in result["train"]]))
    failed = [r for r in result.get("correctness", []) if not r["ok"]]
    print(f"gpu_check: wrote {out / 'gpu_check.json'}" + (f" and {png}" if png else "") +
          f" in {result['wall_s']} s; correctness: {len(failed)} of {len(result.get('correctness', []))} cases failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
