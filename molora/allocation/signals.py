"""Per-layer importance signals for data-driven expert allocation (registered in :mod:`.methods`).

Each signal takes the frozen base model (a Hugging Face model with numbered blocks, see
:mod:`molora.tuner.injection`) and, where it needs data, calibration batches (dicts of ``input_ids``,
``attention_mask`` [B, T] and, for ``grad_norm``, ``labels``), and returns a :class:`LayerScores`: one float per
block, in block order. Nothing here changes the model: hooks and probes are removed before returning.

* :func:`block_influence` -- ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect", in ../shared/seeds/001): ``BI_l = 1 - E_t[cos(h_in_t, h_out_t)]`` of block l,
  the mean over non-padding tokens of the calibration rows. A block that barely changes the residual stream
  (BI near 0) is redundant; one that changes it a lot is where the work happens.
* :func:`attn_mlp` -- the same similarity per sub-block (the attention-vs-MLP redundancy line of work: He et
  al., 2024, "What Matters in Transformers? Not All Attention Is Needed", in ../shared/seeds/001): in a pre-norm
  residual block ``h_mid = h_in + Attn(.)``, ``h_out = h_mid + MLP(.)``, so
  ``BI_attn = 1 - E_t[cos(h_in, h_mid)]`` and ``BI_mlp = 1 - E_t[cos(h_mid, h_out)]`` (parallel blocks,
  ``h_out = h_in + Attn(.) + MLP(.)``: the MLP's is ``1 - E_t[cos(h_in, h_in + MLP(.))]``). Attention and MLP
  projections of one layer then get their own expert counts.
* :func:`alpha_hill` -- AlphaLoRA (Qing et al., EMNLP 2024), from heavy-tailed self-regularisation (Martin &
  Mahoney): the power-law exponent of the empirical spectral density of each targeted weight matrix, estimated
  with the Hill estimator at ``xmin`` = the median non-zero eigenvalue (TempBalance's ``xmin_mid``, the code path
  AlphaLoRA uses): with the non-zero eigenvalues of W^T W sorted ascending, ``i = N // 2``, ``n = N - i``::

      alpha = 1 + n / (sum_{j >= i} ln(lambda_j) - n ln(lambda_i))

  averaged over the layer's targeted matrices. Eigenvalues below 1e-5 (of the unnormalised W^T W) are dropped
  first, as in TempBalance. Checked against weightwatcher (its spectrum, and its Hill fit at the same xmin;
  weightwatcher itself then picks xmin by the KS distance, which AlphaLoRA does not). A heavier tail (smaller
  alpha) means a better-trained layer; AlphaLoRA gives layers with larger alpha more experts
  (E_l ∝ alpha_l^2.5). No data needed.
* :func:`grad_norm` -- the gradient norm a small LoRA probe (rank 4, B = 0 so the model's function is
  unchanged; one molora expert per targeted projection, which is exactly a LoRA) receives per layer on the
  calibration batches' causal-LM loss: ``sqrt(sum over the layer's probes of ||dL/dB||^2)``, averaged over
  batches. Layers the task pulls on harder get more experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tuner.injection import LINEAR_TYPES, block_containers, block_position, module_kind

__all__ = ["LayerScores", "blocks_of", "targeted_linears", "block_influence", "attn_mlp", "sub_blocks",
           "alpha_hill", "alpha_hill_of", "grad_norm"]


@dataclass
class LayerScores:
    """``scores[l]``: the signal of block l; ``detail``: per-module values or counts behind it."""

    method: str
    scores: list[float]
    detail: dict[str, Any] = field(default_factory=dict)
    #: per-kind methods (attn-mlp): ``scores`` are the attention sub-blocks', these the MLP sub-blocks'
    scores_mlp: Optional[list[float]] = None


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's block container (the ``nn.ModuleList`` the allocation is per layer of)."""
    found = block_containers(model)
    if not found:
        raise ValueError("the model has no numbered blocks (no nn.ModuleList of layers around linear layers); "
                         "data-driven allocation is per layer")
    name = max(found, key=found.get)  # the longest list (a decoder's layers, not a 2-entry helper list)
    return name, model.get_submodule(name)


def targeted_linears(model: nn.Module, target_modules: Optional[Iterable[str]] = None):
    """``(name, module, block index)`` of the linear layers inside the model's blocks, optionally only those whose
    leaf name (``q_proj``) or name inside the block (``self_attn.q_proj``) is in ``target_modules``."""
    container, _ = blocks_of(model)
    wanted = set(target_modules) if target_modules else None
    for name, mod in model.named_modules():
        if not isinstance(mod, LINEAR_TYPES):
            continue
        pos = block_position(model, name)
        if pos is None or pos.container != container:
            continue
        if wanted is not None and name.rsplit(".", 1)[-1] not in wanted and pos.rest not in wanted:
            continue
        yield name, mod, pos.index


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _batches(batches: Optional[Iterable[dict]], method: str) -> list[dict]:
    out = list(batches or [])
    if not out:
        raise ValueError(f"{method} needs calibration batches (rows of the recipe's training data)")
    return out


def _device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def _forward_all(model: nn.Module, batches: list[dict], handles: list, mask_now: dict) -> None:
    """Run the batches through the model in eval mode (``mask_now["m"]`` = the current [B, T] attention mask, for
    the hooks), then remove the hooks and restore the training mode."""
    was_training = model.training
    model.eval()
    dev = _device(model)
    try:
        for b in batches:
            ids = b["input_ids"].to(dev)
            att = b.get("attention_mask")
            att = torch.ones_like(ids) if att is None else att.to(dev)
            mask_now["m"] = att
            model(input_ids=ids, attention_mask=att)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[dict], **_: Any) -> LayerScores:
    """ShortGPT block influence per block (see the module doc). [B, T] batches; padding excluded."""
    batches = _batches(batches, "block-influence")
    _, blocks = blocks_of(model)
    n = len(blocks)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    mask_now: dict[str, torch.Tensor] = {}

    def make_hook(idx: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = _first(output)
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [B, T]
            m = mask_now["m"].to(cos.device, torch.float64)
            sums[idx] += (cos.double() * m).sum().cpu()
            counts[idx] += m.sum().cpu()
        return hook

    handles = [blk.register_forward_hook(make_hook(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    _forward_all(model, batches, handles, mask_now)
    scores = (1.0 - sums / counts.clamp_min(1)).tolist()
    return LayerScores("block-influence", scores, {"tokens": int(counts[0].item())})


#: config flags of blocks whose attention and MLP both read the block input (``h_out = h_in + Attn + MLP``)
_PARALLEL_FLAGS = ("use_parallel_residual", "parallel_attn", "parallel_residual")
_PARALLEL_TYPES = ("phi", "gptj", "cohere", "cohere2")


def sub_blocks(block: nn.Module, index: int = 0) -> tuple[nn.Module, nn.Module]:
    """The attention and MLP children of a block (by name, see :func:`molora.tuner.injection.module_kind`)."""
    found: dict[str, nn.Module] = {}
    for name, child in block.named_children():
        kind = module_kind(f"{name}.x")
        if kind is not None and kind not in found:
            found[kind] = child
    missing = [k for k in ("attn", "mlp") if k not in found]
    if missing:
        raise ValueError(f"attn-mlp: block {index} ({type(block).__name__}) has no {' and no '.join(missing)} "
                         f"sub-module by name (children: {', '.join(n for n, _ in block.named_children())}); "
                         f"use block-influence for this architecture")
    return found["attn"], found["mlp"]


def _is_parallel(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    if getattr(cfg, "model_type", None) in _PARALLEL_TYPES:
        return True
    return any(bool(getattr(cfg, f, False)) for f in _PARALLEL_FLAGS)


@torch.no_grad()
def attn_mlp(model: nn.Module, batches: Iterable[dict], *, tolerance: float = 1e-3, **_: Any) -> LayerScores:
    """Block influence of each block's attention and MLP sub-block (see the module doc). [B, T] batches, padding
    excluded. Each block must be a residual block ``h_out = h_in + Attn(.) + MLP(.)`` (pre-norm, sequential or
    parallel); that identity is checked on every batch (relative error above ``tolerance`` in fp32 -- 3e-2 for
    16-bit models -- raises naming the block: post-norm blocks like BERT's or extra norms after the sub-blocks
    like Gemma's do not fit this measurement)."""
    batches = _batches(batches, "attn-mlp")
    _, blocks = blocks_of(model)
    n = len(blocks)
    parallel = _is_parallel(model)
    subs = [sub_blocks(blk, i) for i, blk in enumerate(blocks)]
    sums = torch.zeros(2, n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    mask_now: dict[str, torch.Tensor] = {}
    tol = tolerance if next(model.parameters()).dtype == torch.float32 else max(tolerance, 3e-2)

    def keep(idx: int, kind: str):
        def hook(module, args, output):
            seen[(idx, kind)] = _first(output)
        return hook

    def on_block(idx: int):
        def hook(module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = _first(output).float()
            a, m = seen.pop((idx, "attn")).float(), seen.pop((idx, "mlp")).float()
            mask = mask_now["m"].to(h_out.device).bool()
            if a.shape == h_in.shape == m.shape == h_out.shape:
                h_mid = h_in + a
                err = float((h_mid + m - h_out)[mask].norm() / h_out[mask].norm().clamp_min(1e-30))
            else:  # a sub-module that is not a whole sub-block (BERT's `intermediate` is the MLP's first half)
                err = float("inf")
            if not err <= tol:
                raise ValueError(
                    f"attn-mlp: block {idx} ({type(module).__name__}) is not a residual block h_out = h_in + "
                    f"attention + MLP (relative error {err:.2g} > {tol:g}): post-norm blocks (BERT) or norms after "
                    f"the sub-blocks (Gemma 2/3) do not fit this measurement; use block-influence")
            w = mask.to(torch.float64)
            mlp_in = h_in if parallel else h_mid
            for j, (x, y) in enumerate(((h_in, h_mid), (mlp_in, mlp_in + m))):
                cos = F.cosine_similarity(x, y, dim=-1)  # [B, T]
                sums[j, idx] += (cos.double() * w).sum().cpu()
            counts[idx] += w.sum().cpu()
        return hook

    handles = []
    for i, (blk, (att, mlp)) in enumerate(zip(blocks, subs)):
        handles.append(att.register_forward_hook(keep(i, "attn")))
        handles.append(mlp.register_forward_hook(keep(i, "mlp")))
        handles.append(blk.register_forward_hook(on_block(i), with_kwargs=True))
    _forward_all(model, batches, handles, mask_now)
    scores = (1.0 - sums / counts.clamp_min(1)).tolist()
    return LayerScores("attn-mlp", scores[0], {"tokens": int(counts[0].item()), "parallel": parallel},
                       scores_mlp=scores[1])


def alpha_hill_of(weight: torch.Tensor, evals_thresh: float = 1e-5) -> float:
    """PL alpha-Hill of one weight matrix (TempBalance/AlphaLoRA ``xmin_mid``; see the module doc)."""
    w = weight.detach().float()
    eigs = torch.linalg.svdvals(w).double() ** 2
    eigs, _ = torch.sort(eigs)
    nz = eigs[eigs > evals_thresh]
    n_all = int(nz.numel())
    if n_all < 2:
        raise ValueError(f"a {tuple(weight.shape)} weight has {n_all} eigenvalues above {evals_thresh}: alpha-Hill "
                         f"needs at least 2")
    i = n_all // 2
    n = float(n_all - i)
    logs = torch.log(nz)
    return float(1.0 + n / (logs[i:].sum() - n * logs[i]))


@torch.no_grad()
def alpha_hill(model: nn.Module, batches: Optional[Iterable[dict]] = None, *,
               target_modules: Optional[Iterable[str]] = None, **_: Any) -> LayerScores:
    """Mean alpha-Hill of the targeted weights of each block (no data used). ``target_modules``: leaf names to
    include (default: every linear layer inside the blocks)."""
    _, blocks = blocks_of(model)
    wanted = set(target_modules) if target_modules else None
    per_layer: list[list[float]] = [[] for _ in blocks]
    detail: dict[str, float] = {}
    for name, mod, index in targeted_linears(model, wanted):
        a = alpha_hill_of(mod.weight)
        per_layer[index].append(a)
        detail[name] = a
    empty = [i for i, v in enumerate(per_layer) if not v]
    if empty:
        raise ValueError(f"alpha-hill: no targeted weight in layer(s) {empty[:5]} (target_modules="
                         f"{sorted(wanted) if wanted else 'all'})")
    return LayerScores("alpha-hill", [sum(v) / len(v) for v in per_layer], {"alpha": detail})


def grad_norm(model: nn.Module, batches: Iterable[dict], *, target_modules: Optional[Iterable[str]] = None,
              rank: int = 4, seed: int = 0, **_: Any) -> LayerScores:
    """Per-block gradient norm of a rank-``rank`` LoRA probe on the batches' loss (see the module doc). The
    batches need ``labels``. The probe is injected with molora itself (one expert per projection) and removed."""
    from peft import get_peft_model

    import molora

    from ..tuner.compat import peft_wrap
    from ..tuner.config import MoLoRAConfig

    molora.register()  # under the `molora` command the package is imported without registering with PEFT

    batches = _batches(batches, "grad-norm")
    if any("labels" not in b for b in batches):
        raise ValueError("grad-norm needs labelled calibration batches (input_ids, attention_mask, labels)")
    _, blocks = blocks_of(model)
    n = len(blocks)
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    cfg = MoLoRAConfig(num_experts=1, top_k=1, r=rank, lora_alpha=rank, lora_dropout=0.0, aux_loss_coef=0.0,
                       target_modules=list(target_modules) if target_modules else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = peft_wrap(lambda: get_peft_model(model, cfg, adapter_name="_molora_probe"), model)
    was_training = model.training
    peft_model.eval()  # no dropout: the same numbers every time
    dev = _device(model)
    totals = torch.zeros(n, dtype=torch.float64)
    try:
        probes = [(m.layer_index, m.molora_B["_molora_probe"]) for m in peft_model.modules()
                  if hasattr(m, "molora_B") and "_molora_probe" in getattr(m, "molora_B", {})]
        for b in batches:
            peft_model.zero_grad(set_to_none=True)
            out = peft_model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                             labels=b["labels"].to(dev))
            out.loss.backward()
            sq = torch.zeros(n, dtype=torch.float64)
            for layer, param in probes:
                if param.grad is not None:
                    sq[layer] += param.grad.double().pow(2).sum().cpu()
            totals += sq.sqrt()
    finally:
        base = peft_model.unload()  # the original modules back, probe gone
        for p, g in saved_grad.items():
            p.requires_grad_(g)
            p.grad = None
        base.train(was_training)
    return LayerScores("grad-norm", (totals / len(batches)).tolist(), {"rank": rank, "batches": len(batches)})
