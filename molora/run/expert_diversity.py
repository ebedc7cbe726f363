"""How different the experts' updates are: mean pairwise cosine of ΔW_e = B_e A_e within each module.

A mixture whose experts all learned the same update is one LoRA however it routes. For two experts of one module
(``A_e`` [r, d_in], ``B_e`` [d_out, r]) the cosine of their updates is computed without forming d_out × d_in
matrices:

    <B_i A_i, B_j A_j>_F = trace((B_i^T B_j) (A_j A_i^T))        (r × r products)
    cos_ij = <ΔW_i, ΔW_j>_F / (||ΔW_i||_F ||ΔW_j||_F)

1 means identical directions, 0 unrelated ones. With the ``shared_a`` layout (one A for every head) only the B
heads differ. Reported per layer (mean over the layer's modules and expert pairs) by ``molora report`` and in the
sweep tables; modules with one expert, or whose experts are all zero (B = 0 at init), are skipped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

__all__ = ["expert_update_cosines", "adapter_expert_similarity"]

_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


def expert_update_cosines(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> Optional[torch.Tensor]:
    """[E, E] cosines of the experts' updates of one module (float64), or None when some expert's update is zero.

    ``a``: [E·r, d_in] (stacked) or [r, d_in] (``shared_a``); ``b``: [d_out, E·r]."""
    e = num_experts
    er = b.shape[1]
    r = er // e
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    As = [a64[i * r:(i + 1) * r] if a64.shape[0] == er else a64 for i in range(e)]
    Bs = [b64[:, i * r:(i + 1) * r] for i in range(e)]
    gram = torch.empty(e, e, dtype=torch.float64)
    for i in range(e):
        for j in range(i, e):
            gram[i, j] = gram[j, i] = torch.trace((Bs[i].T @ Bs[j]) @ (As[j] @ As[i].T))
    norms = gram.diagonal().clamp_min(0).sqrt()
    if bool((norms <= 0).any()):
        return None
    return gram / (norms[:, None] * norms[None, :])


def adapter_expert_similarity(adapter_dir: Path | str) -> dict[int, float]:
    """``{layer: mean pairwise cosine of its experts' updates}`` of a saved molora adapter (empty when no module has
    two or more trained experts)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if str(cfg.get("peft_type", "")).upper() != "MOLORA":
        return {}
    per_layer: dict[int, list[float]] = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for key in sorted(k for k in keys if k.endswith(".molora_router")):
            stem = key[: -len("molora_router")]
            if stem + "molora_A" not in keys or stem + "molora_B" not in keys:
                continue
            e = f.get_slice(key).get_shape()[0]
            if e < 2:
                continue
            cos = expert_update_cosines(f.get_tensor(stem + "molora_A"), f.get_tensor(stem + "molora_B"), e)
            if cos is None:
                continue
            m = _LAYER.search(key)
            layer = int(m.group(1)) if m else -1
            off = cos[~torch.eye(e, dtype=torch.bool)]
            per_layer.setdefault(layer, []).append(float(off.mean()))
    return {layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())}
