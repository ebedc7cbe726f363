"""Training telemetry: router statistics accumulated over micro-batches, ``metrics.jsonl`` and wandb.

* :class:`RouterTelemetry` hooks the wrapped model's forward. After every *training* forward it reads
  :func:`molora.router_summary` (per layer: load per expert, router entropy) and adds it, weighted by the tokens
  the layer routed, into one flat float64 buffer laid out from the model's allocation (the same on every rank,
  so the buffer can be all-reduced). :meth:`RouterTelemetry.collect` turns the buffer into per-layer averages
  over the logging interval and resets it.
* :class:`MetricsWriter` appends one JSON object per line to ``OUTPUT_DIR/metrics.jsonl`` (rank 0 only), flushed
  at every record so a killed run keeps its log.
* :func:`configure_wandb` makes wandb safe to use unattended: offline unless an API key is available, silent,
  and never an interactive login.

Record types written to metrics.jsonl (``type`` field): ``run`` (recipe, allocation), ``train`` (step, loss,
task_loss, aux_loss, learning_rate, grad_norm, tokens_per_s, router), ``eval`` (eval_loss ...), ``accuracy``
(stage before/after, loglik/generation results), ``summary`` (end of run). ``router`` is::

    {"layers": [0, 1, ...], "num_experts": [2, 2, ...], "top_k": [...], "tokens": [...],
     "load": [[f_e, ...], ...],           # fraction of the layer's top-k selections per expert (sums to 1)
     "entropy": [...], "entropy_norm": [...],   # mean router entropy per token (nats; / log E)
     "imbalance": [...],                  # max load * E (1 = balanced, E = one expert takes all)
     "dropped": [...]}                    # fraction of tokens no expert computed (Switch / expert-choice capacity)
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..tuner.summary import _tuner

__all__ = ["RouterTelemetry", "MetricsWriter", "configure_wandb", "flat_router_scalars", "read_metrics"]


class RouterTelemetry:
    """Accumulates :func:`molora.router_summary` over the training forwards of a logging interval.

    Args:
        model: the PeftModel (or MoLoRAModel) being trained.
        soft_router: use the gate mass (``gate_load``) as the load everywhere (layers whose router weights every
            expert -- ``soft`` -- use it anyway)
    """

    def __init__(self, model: torch.nn.Module, soft_router: bool = False) -> None:
        from ..tuner.summary import allocation_table

        self.model = model
        self.tuner = _tuner(model)
        self.soft_router = soft_router
        table = allocation_table(model)
        self.layers = [row.key for row in table]  # router groups: layer index, or "3.attn"/"3.mlp" when split
        self.num_experts = [row.num_experts for row in table]
        self.top_k = [row.top_k for row in table]
        self.modules = [max(1, row.modules) for row in table]  # router_summary counts tokens once per module
        self.offsets: dict[Any, int] = {}
        off = 0
        for layer, e in zip(self.layers, self.num_experts):
            self.offsets[layer] = off
            off += 4 + e  # tokens, entropy*tokens, entropy_norm*tokens, dropped*tokens, load*tokens (E)
        self.size = off
        self.buffer = torch.zeros(self.size, dtype=torch.float64)
        self.forwards = 0
        # on the wrapped model, as the tuner's own hooks: a PeftModel without a task type calls it directly, never
        # the tuner's forward; registered after the tuner's, so the forward's routing is complete when this runs
        self._handle = self.tuner.model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if not module.training:
            return
        self.add(self.tuner.router_summary())

    def add(self, summary: dict) -> None:
        """Add one forward's ``router_summary`` (token-weighted)."""
        buf = self.buffer
        for layer, s in summary.items():
            off = self.offsets.get(layer)
            if off is None:
                continue
            w = float(s["tokens"])
            if w <= 0:
                continue
            e = int(s["num_experts"])
            soft = self.soft_router or not s.get("selects_top_k", True)  # a router weighting every expert
            load = s["gate_load"] if soft else s["load"]
            buf[off] += w
            buf[off + 1] += float(s["entropy"]) * w
            buf[off + 2] += float(s["entropy_norm"]) * w
            buf[off + 3] += float(s["dropped"]) * w
            buf[off + 4: off + 4 + e] += torch.tensor(load, dtype=torch.float64) * w
        self.forwards += 1

    def collect(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Optional[dict[str, Any]]:
        """Per-layer averages since the last call (then reset); None if nothing was recorded.

        Args:
            reduce: e.g. an all-reduce (SUM) over ranks of the flat buffer; every rank must call it together.
        """
        buf = self.buffer.clone()
        forwards = torch.tensor([float(self.forwards)], dtype=torch.float64)
        if reduce is not None:
            both = reduce(torch.cat([buf, forwards]))
            buf, forwards = both[:-1], both[-1:]
        self.buffer.zero_()
        self.forwards = 0
        if float(forwards[0]) == 0:
            return None
        out: dict[str, Any] = {"layers": [], "num_experts": [], "top_k": [], "tokens": [], "load": [], "entropy": [],
                               "entropy_norm": [], "imbalance": [], "dropped": [], "forwards": int(forwards[0])}
        for layer, e, k, n_mod in zip(self.layers, self.num_experts, self.top_k, self.modules):
            off = self.offsets[layer]
            w = float(buf[off])
            if w <= 0:
                continue
            load = (buf[off + 4: off + 4 + e] / w).tolist()
            out["layers"].append(layer)
            out["num_experts"].append(e)
            out["top_k"].append(k)
            out["tokens"].append(round(w / n_mod, 1))
            out["load"].append([round(x, 6) for x in load])
            out["entropy"].append(round(float(buf[off + 1]) / w, 6))
            out["entropy_norm"].append(round(float(buf[off + 2]) / w, 6))
            out["imbalance"].append(round(max(load) * e, 6))
            out["dropped"].append(round(float(buf[off + 3]) / w, 6))
        return out

    def close(self) -> None:
        self._handle.remove()


def flat_router_scalars(router: dict[str, Any], prefix: str = "router") -> dict[str, float]:
    """wandb-friendly scalars: ``router/L03/entropy_norm``, ``router/L03/imbalance``, ``router/L03/load_e2``."""
    out: dict[str, float] = {}
    dropping = any(router.get("dropped") or [])  # only where a capacity router drops tokens
    for i, layer in enumerate(router["layers"]):
        tag = "all" if layer is None else (f"L{layer:02d}" if isinstance(layer, int) else
                                           f"L{int(str(layer).split('.')[0]):02d}.{str(layer).split('.')[1]}")
        out[f"{prefix}/{tag}/entropy_norm"] = router["entropy_norm"][i]
        out[f"{prefix}/{tag}/imbalance"] = router["imbalance"][i]
        if dropping:
            out[f"{prefix}/{tag}/dropped"] = router["dropped"][i]
        for e, v in enumerate(router["load"][i]):
            out[f"{prefix}/{tag}/load_e{e}"] = v
    return out


def router_headline(router: dict[str, Any]) -> dict[str, float]:
    """Numbers for the console/progress log: mean normalised entropy over the routed layers (E > top_k; a layer
    with one expert, or as many experts as top_k, has no choice to make and would read as uniform), worst imbalance
    over layers (and the worst fraction of dropped tokens, when a capacity router drops any)."""
    if not router or not router["layers"]:
        return {}
    ents = [h for h, e, k in zip(router["entropy_norm"], router["num_experts"], router["top_k"], strict=True)
            if e > k]
    out = {"router_entropy_norm": round(sum(ents) / len(ents), 4)} if ents else {}
    out["router_max_imbalance"] = round(max(router["imbalance"]), 4)
    if any(router.get("dropped") or []):  # only where a capacity router drops tokens
        out["router_max_dropped"] = round(max(router["dropped"]), 4)
    return out


class MetricsWriter:
    """Appends JSON records to ``path`` (one per line), flushing each; a no-op when ``enabled`` is False."""

    def __init__(self, path: os.PathLike | str, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._fh = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._fh is None:
            return
        record = {"time": round(time.time(), 3), **record}
        self._fh.write(json.dumps(_jsonable(record), ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist()) if x.numel() != 1 else float(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def read_metrics(path: os.PathLike | str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


#: WANDB_MODE as the user's environment had it (configure_wandb sets WANDB_MODE itself for each run)
_USER_WANDB_MODE = os.environ.get("WANDB_MODE")


def _have_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def configure_wandb(enabled: bool, mode: str, project: str, output_dir: os.PathLike | str) -> Optional[str]:
    """Set the environment so wandb never prompts or blocks; return the mode used (None: wandb not used).

    ``mode="auto"``: online when an API key is available (WANDB_API_KEY or ~/.netrc), else offline. ``online``
    without a key falls back to offline (with a note) instead of asking for a login. An explicit
    ``WANDB_MODE`` in the environment wins over ``auto``.
    """
    if not enabled or mode == "disabled":
        os.environ["WANDB_MODE"] = "disabled"
        return None
    try:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            return None
    except (ImportError, ValueError):
        return None
    if mode == "auto":
        mode = _USER_WANDB_MODE or ("online" if _have_wandb_key() else "offline")
        if mode == "disabled":
            os.environ["WANDB_MODE"] = "disabled"
            return None
    if mode == "online" and not _have_wandb_key():
        print("molora: wandb online mode needs WANDB_API_KEY; logging offline instead "
              "(sync later with `wandb sync`)", flush=True)
        mode = "offline"
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ["WANDB_PROJECT"] = project
    os.environ["WANDB_DIR"] = str(Path(output_dir).resolve())  # the run's files live with the run
    os.environ.setdefault("WANDB_WATCH", "false")
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    return mode
