"""Kernel benchmark: one MoLoRA linear layer against PEFT LoRA, the per-expert loop and the frozen floor.

For every point (T tokens, d = d_in = d_out, E experts, top-k, rank r, dtype) and mode (``fwd``: forward
under ``no_grad``; ``fwdbwd``: forward + backward with x requiring grad, as in a middle layer) it times,
alternated side by side in one run (benchmarks/common.py):

* ``frozen``           the frozen ``nn.Linear`` alone (the floor: every variant pays it);
* ``peft-r``           ``peft.tuners.lora.Linear`` of rank r around the same frozen layer (the target);
* ``peft-Er``          PEFT LoRA of rank E·r (same adapter parameter count as the mixture);
* ``loop``             a faithful per-expert loop (MixLoRA / MoLA style: fp32 softmax, top-k, renorm,
                       ``index_select`` of each expert's tokens, two ``F.linear``, ``index_add_``);
* ``molora/<backend>`` ``base(x) + moe_lora(..., backend=<backend>).delta`` with router statistics,
                       as ``molora.Linear`` calls it, for each available backend;
* ``molora/torch+base`` the same with the add fused into the op (``moe_lora(..., base=base(x))``).

Every time is reported as a ratio to ``peft-r`` of the same point (lower is better). Writes
``bench_kernels.json`` and ``bench_kernels.png`` to ``--out`` (default ``benchmarks/results/``).

    python benchmarks/bench_kernels.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/bench_kernels.py                  # the full grid (hours on CPU; meant for GPUs)
    python benchmarks/bench_kernels.py --T 2048 --d 2048 --configs 8,2,8 64,2,16
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent / "kernels") not in sys.path:
    sys.path.insert(1, str(_HERE.parent / "kernels"))   # run from a checkout without installing
from common import (add_output_args, environment, format_table, output_dir, plot_ratio_bars,  # noqa: E402
                    time_alternating, write_json)

import molora_kernels  # noqa: E402
from molora_kernels import ROUTERS, available_backends, moe_lora  # noqa: E402

FULL_T = (512, 2048, 8192)
FULL_D = (1024, 2048, 4096)
FULL_CONFIGS = ((2, 2, 8), (8, 2, 8), (8, 2, 16), (32, 4, 16))
# (T, d, E, k, r): includes the target point T=2048, d=2048, E=8, k=2, r=8
QUICK_POINTS = ((2048, 2048, 8, 2, 8), (512, 1024, 2, 2, 8), (512, 1024, 8, 2, 16), (512, 1024, 32, 4, 16))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# Baselines


class PerExpertLoop(nn.Module):
    """The per-expert loop of MixLoRA / MoLA-style code, with separate parameters per expert."""

    def __init__(self, d_in: int, d_out: int, num_experts: int, top_k: int, rank: int, scaling: float,
                 a_all: torch.Tensor, b_all: torch.Tensor, router_weight: torch.Tensor) -> None:
        super().__init__()
        self.top_k, self.scaling, self.num_experts = top_k, scaling, num_experts
        self.router = nn.Parameter(router_weight.detach().clone())
        self.lora_A = nn.ParameterList(
            [nn.Parameter(a_all.detach()[e * rank:(e + 1) * rank].clone()) for e in range(num_experts)])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(b_all.detach()[:, e * rank:(e + 1) * rank].clone()) for e in range(num_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(F.linear(x2, self.router).float(), dim=-1)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x2.dtype)
        out = torch.zeros(x2.shape[0], self.lora_B[0].shape[0], dtype=x2.dtype, device=x2.device)
        expert_mask = F.one_hot(selected, self.num_experts).permute(2, 1, 0)   # [E, k, T]
        for e in range(self.num_experts):
            slot, tok = torch.where(expert_mask[e])
            xe = x2.index_select(0, tok)
            ye = F.linear(F.linear(xe, self.lora_A[e]), self.lora_B[e])
            out.index_add_(0, tok, ye * (weights[tok, slot, None] * self.scaling))
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _peft_linear(base: nn.Linear, rank: int, dtype: torch.dtype) -> Optional[nn.Module]:
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as LoraLinear
    except Exception:
        return None
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
    layer = LoraLinear(base, "default", cfg, r=rank, lora_alpha=2 * rank)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)   # non-zero B: no shortcut anywhere
    return layer.to(dtype)


# --------------------------------------------------------------------------------------------------
# One point


def build_point(tokens: int, d: int, num_experts: int, top_k: int, rank: int, dtype: torch.dtype,
                device: torch.device, backends: Sequence[str], with_loop: bool = True,
                with_fused_base: bool = True) -> tuple[dict[str, Callable[[], torch.Tensor]], list[torch.Tensor],
                                                        torch.Tensor]:
    """The layer variants of one point: name -> forward callable (input x captured), params, x."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    scaling = 2.0
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(device=device, dtype=torch.float32)  # noqa: E731
    a_all = nn.Parameter(mk(num_experts * rank, d))
    b_all = nn.Parameter(mk(d, num_experts * rank))
    w_router = nn.Parameter(mk(num_experts, d))
    x = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype)
    params: list[torch.Tensor] = [a_all, b_all, w_router]

    # adapter weights in the compute dtype, as a mixed-precision run keeps them
    if dtype != torch.float32:
        a_all.data, b_all.data, w_router.data = a_all.data.to(dtype), b_all.data.to(dtype), w_router.data.to(dtype)

    variants: dict[str, Callable[[], torch.Tensor]] = {"frozen": lambda: base(x)}
    for name, rr in (("peft-r", rank), ("peft-Er", num_experts * rank)):
        if name == "peft-Er" and rr == rank:
            continue
        layer = _peft_linear(base, rr, dtype)
        if layer is not None:
            params += [p for p in layer.parameters() if p.requires_grad]
            variants[name] = (lambda lay: (lambda: lay(x)))(layer)
    if with_loop:
        loop = PerExpertLoop(d, d, num_experts, top_k, rank, scaling, a_all, b_all, w_router).to(device)
        params += list(loop.parameters())
        variants["loop"] = lambda: base(x) + loop(x)
    for be in backends:
        def run(be=be):
            out = moe_lora(x, a_all, b_all, w_router, top_k=top_k, scaling=scaling, backend=be)
            return base(x) + out.delta
        variants[f"molora/{be}"] = run
        if be == "torch" and with_fused_base:
            variants["molora/torch+base"] = lambda: moe_lora(x, a_all, b_all, w_router, top_k=top_k, scaling=scaling,
                                                             backend="torch", base=base(x)).delta
    if "torch" in backends:  # one row per other registered router the fused torch backend implements
        ids = torch.randint(0, 50_000, x.shape[:-1], device=x.device)  # for routers that route by token id
        for rname, router in ROUTERS.items():
            if rname != "topk" and "torch" in router.backends:
                k = router.required_top_k or top_k
                tid = ids if router.needs_token_ids else None
                # a router that draws noise in training (noisy_topk) is timed drawing it
                variants[f"molora/torch[{rname}]"] = (lambda rn, k, tid, tr: lambda: base(x) + moe_lora(
                    x, a_all, b_all, w_router, top_k=k, scaling=scaling, backend="torch", router=rn,
                    token_ids=tid, training=tr).delta)(rname, k, tid, router.stochastic)
        # one row per other layout (its own A: shared_a has one [r, d_in])
        a_shared = nn.Parameter(a_all.detach()[:rank].clone())
        params.append(a_shared)
        variants["molora/torch[shared_a]"] = lambda: base(x) + moe_lora(
            x, a_shared, b_all, w_router, top_k=top_k, scaling=scaling, backend="torch", layout="shared_a").delta
    return variants, params, x


def bench_point(tokens: int, d: int, num_experts: int, top_k: int, rank: int, dtype_name: str,
                device: torch.device, backends: Sequence[str], modes: Sequence[str], warmup: int, reps: int,
                min_time: float, with_loop: bool = True) -> list[dict[str, Any]]:
    dtype = DTYPES[dtype_name]
    fwd_variants, params, x = build_point(tokens, d, num_experts, top_k, rank, dtype, device, backends, with_loop)
    dy = torch.randn(tokens, d, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    results = []
    for mode in modes:
        if mode == "fwd":
            x.requires_grad_(False)

            def wrap(f):
                def call():
                    with torch.no_grad():
                        f()
                return call
            setup = None
        else:
            x.requires_grad_(True)

            def wrap(f):
                return lambda: f().backward(dy)

            def setup():
                x.grad = None
                for p in params:
                    p.grad = None
        timed = {n: wrap(f) for n, f in fwd_variants.items()}
        summary = time_alternating(timed, warmup=warmup, reps=reps, min_time=min_time, device=device, setup=setup)
        ref_name = "peft-r" if "peft-r" in summary else "frozen"
        ref = summary[ref_name]["median"]
        auto = molora_kernels.ops.resolve_backend(
            "auto", x.detach(), params[0], params[1], params[2], top_k, "topk", mode != "fwd")
        results.append({
            "T": tokens, "d": d, "E": num_experts, "k": top_k, "r": rank, "dtype": dtype_name, "mode": mode,
            "device": str(device), "auto_backend": auto,
            "reference_variant": ref_name, "peft_ranks": {"peft-r": rank, "peft-Er": num_experts * rank},
            "times": summary,
            "ratios": {n: s["median"] / ref for n, s in summary.items()},
        })
    return results


# --------------------------------------------------------------------------------------------------
# CLI


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid (incl. T=2048, d=2048, E=8, k=2, r=8)")
    p.add_argument("--T", type=int, nargs="+", default=None, help=f"token counts (default {FULL_T})")
    p.add_argument("--d", type=int, nargs="+", default=None, help=f"d_in = d_out (default {FULL_D})")
    p.add_argument("--configs", nargs="+", default=None, metavar="E,k,r",
                   help="expert configs (default " + " ".join(",".join(map(str, c)) for c in FULL_CONFIGS) + ")")
    p.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                   help="default fp32 on CPU, fp32 and bf16 on CUDA")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--backends", nargs="+", default=None, help="molora backends (default: all available)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="timed rounds per point (each variant once a round)")
    p.add_argument("--min-time", type=float, default=None, help="add rounds until the slowest variant ran this long (s)")
    p.add_argument("--no-loop", action="store_true", help="skip the per-expert loop baseline")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    add_output_args(p, "bench_kernels")
    return p.parse_args(argv)


def _points(a: argparse.Namespace) -> list[tuple[int, int, int, int, int]]:
    if a.quick and a.T is None and a.d is None and a.configs is None:
        return list(QUICK_POINTS)
    configs = FULL_CONFIGS if a.configs is None else [tuple(int(v) for v in c.split(",")) for c in a.configs]
    for c in configs:
        if len(c) != 3:
            raise SystemExit(f"--configs takes E,k,r triples, got {c}")
    return [(t, d, *c) for t in (a.T or FULL_T) for d in (a.d or FULL_D) for c in configs]


def run(a: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    dtypes = a.dtypes or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    backends = a.backends or available_backends(device)
    for be in backends:
        if be not in available_backends(device):
            raise SystemExit(f"backend {be!r} is not available on {device}; available: "
                             f"{', '.join(available_backends(device))}")
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    reps = a.reps if a.reps is not None else (7 if a.quick else 15)
    min_time = a.min_time if a.min_time is not None else (0.0 if a.quick else 2.0)
    points = _points(a)
    print(f"bench_kernels: {len(points)} points x {len(dtypes)} dtypes x modes {a.modes} on {device} "
          f"({torch.get_num_threads()} threads), backends {backends}, warmup {warmup}, reps >= {reps}", flush=True)
    results: list[dict[str, Any]] = []
    for dtype_name in dtypes:
        for (t, d, e, k, r) in points:
            if not 1 <= k <= e:
                print(f"skip E={e} k={k}: need 1 <= k <= E")
                continue
            res = bench_point(t, d, e, k, r, dtype_name, device, backends, a.modes, warmup, reps, min_time,
                              with_loop=not a.no_loop)
            for item in res:
                rat = item["ratios"]
                short = "  ".join(f"{n}={v:.2f}" for n, v in rat.items())
                print(f"  T={t} d={d} E={e} k={k} r={r} {dtype_name} {item['mode']}: {short}", flush=True)
            results.extend(res)
    _report(results, output_dir(a))
    return {"benchmark": "kernels", "environment": environment(), "device": str(device),
            "backends": backends, "results": results}


def _label(item: dict[str, Any]) -> str:
    return f"T{item['T']} d{item['d']} E{item['E']}k{item['k']}r{item['r']} {item['dtype']}"


def _report(results: list[dict[str, Any]], out: Path) -> None:
    for mode in dict.fromkeys(r["mode"] for r in results):
        items = [r for r in results if r["mode"] == mode]
        names: list[str] = []
        for it in items:
            names += [n for n in it["ratios"] if n not in names]
        rows = [[_label(it)] + [it["ratios"].get(n) for n in names] + [it["auto_backend"]] for it in items]
        print(f"\n{mode}: median time / PEFT LoRA rank r of the same point (lower is better; frozen = the floor)")
        print(format_table(["point"] + names + ["auto"], rows))


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = _parse(argv)
    payload = run(a)
    out = output_dir(a)
    jpath = write_json(out / "bench_kernels.json", payload)
    ppaths = []
    for mode in dict.fromkeys(r["mode"] for r in payload["results"]):
        items = [r for r in payload["results"] if r["mode"] == mode]
        variants: list[str] = []
        for it in items:
            variants += [n for n in it["ratios"] if n not in variants]
        series = {n: [it["ratios"].get(n) for it in items] for n in variants}
        pp = plot_ratio_bars(out / f"bench_kernels_{mode}.png", [_label(it) for it in items], series,
                             title=f"One MoLoRA layer, {mode}: time / PEFT LoRA rank r (lower is better)",
                             ylabel="ratio to PEFT LoRA r", log=True)
        if pp:
            ppaths.append(str(pp))
    print(f"\nwrote {jpath}" + (f" and {', '.join(ppaths)}" if ppaths else ""))
    return 0


if __name__ == "__main__":
    main()
