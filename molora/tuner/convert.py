"""Import checkpoints written by the original MoLA code (GCYZSL/MoLA, a hacked peft 0.4) into molora.

The original format (one directory):

* ``adapter_model.bin``: ``torch.save`` of a state dict with, for each targeted module of layer i,
  ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A_{e}.weight`` [r_i, d_in],
  ``...q_proj.lora_B_{e}.weight`` [d_out, r_i] for e = 0..E_i-1 and ``...q_proj.router.router.weight``
  [E_i, d_in] (no bias);
* ``adapter_config.json``: a peft ``LoraConfig`` whose ``r`` may be a per-layer list; scaling = lora_alpha / r_i.
  The number of experts and the top-k per layer are not stored: the user passes them (the experts can also be
  read off the router shapes, and are checked against them).

molora stores the experts of a module stacked: ``molora_A`` = cat_e(lora_A_e) [E·r, d_in],
``molora_B`` = cat_e(lora_B_e, dim=1) [d_out, E·r], ``molora_router`` = the router weight. The mixture is the same
function, so outputs are identical.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from ..allocation import AllocationError, AllocationSpec, resolve_allocation

KEY_RE = re.compile(
    r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<rest>.+?)\.(?:(?P<ab>lora_[AB])_(?P<expert>\d+)\.weight|router\.router\.weight)$"
)


class ConversionError(ValueError):
    """The source is not an original MoLA checkpoint, or it disagrees with the given allocation."""


def _load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    if (src / "adapter_model.bin").exists():
        return torch.load(src / "adapter_model.bin", map_location="cpu", weights_only=True)
    if (src / "adapter_model.safetensors").exists():
        return load_file(str(src / "adapter_model.safetensors"))
    raise ConversionError(f"{src} holds neither adapter_model.bin nor adapter_model.safetensors; "
                          f"expected a checkpoint saved by the original MoLA code")


def parse_mola_state_dict(sd: dict[str, torch.Tensor]) -> dict[tuple[str, int, str], dict]:
    """Group the keys by module: {(prefix, layer, rest): {"A": {e: W}, "B": {e: W}, "router": W}}."""
    modules: dict[tuple[str, int, str], dict] = defaultdict(lambda: {"A": {}, "B": {}, "router": None})
    unknown = []
    for key, value in sd.items():
        m = KEY_RE.match(key)
        if m is None:
            unknown.append(key)
            continue
        mod = modules[(m["prefix"], int(m["layer"]), m["rest"])]
        if m["ab"] is None:
            mod["router"] = value
        else:
            mod["A" if m["ab"] == "lora_A" else "B"][int(m["expert"])] = value
    if unknown:
        raise ConversionError(f"{len(unknown)} keys are not in the MoLA format (lora_A_{{e}}, lora_B_{{e}}, "
                              f"router.router), e.g. {unknown[0]!r}")
    if not modules:
        raise ConversionError("the state dict holds no MoLA keys")
    return dict(modules)


def convert_mola(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], num_experts: AllocationSpec,
                 top_k: AllocationSpec, num_layers: Optional[int] = None,
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Convert an original MoLA checkpoint directory ``src`` into a molora (PEFT) checkpoint at ``dst``.

    Args:
        num_experts, top_k: the per-layer allocation used in training (int, list or block notation "2,4,6,8").
        num_layers: layers of the base model (default: highest layer index in the checkpoint + 1).
        base_model_name_or_path: recorded in the new adapter_config.json (default: the source config's).
    Returns:
        the destination path; written atomically (a temp dir renamed into place).
    """
    src, dst = Path(src), Path(dst)
    cfg_path = src / "adapter_config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{cfg_path} not found; the original MoLA code writes it beside adapter_model.bin")
    lora_cfg = json.loads(cfg_path.read_text())
    modules = parse_mola_state_dict(_load_state_dict(src))
    layers_seen = sorted({layer for _, layer, _ in modules})
    n_layers = num_layers if num_layers is not None else layers_seen[-1] + 1
    r_spec = lora_cfg.get("r", 8)
    if isinstance(r_spec, list) and len(r_spec) != n_layers:
        raise ConversionError(f"adapter_config.json has r with {len(r_spec)} entries but the checkpoint has "
                              f"{n_layers} layers")
    alloc = resolve_allocation(num_experts, top_k, r_spec, n_layers)
    alpha = lora_cfg.get("lora_alpha", 16)

    out: dict[str, torch.Tensor] = {}
    leaf_names = set()
    for (prefix, layer, rest), mod in sorted(modules.items()):
        a = alloc[layer]
        name = f"{prefix}.{layer}.{rest}"
        router = mod["router"]
        if router is None:
            raise ConversionError(f"{name} has experts but no router.router.weight")
        if router.shape[0] != a.num_experts:
            raise ConversionError(f"{name}: the checkpoint's router has {router.shape[0]} experts but the given "
                                  f"num_experts is {a.num_experts} for layer {layer}")
        want = set(range(a.num_experts))
        if set(mod["A"]) != want or set(mod["B"]) != want:
            raise ConversionError(f"{name}: expected lora_A_/lora_B_ for experts 0..{a.num_experts - 1}, found "
                                  f"A {sorted(mod['A'])}, B {sorted(mod['B'])}")
        A = torch.cat([mod["A"][e] for e in range(a.num_experts)], dim=0)
        B = torch.cat([mod["B"][e] for e in range(a.num_experts)], dim=1)
        if A.shape[0] != a.num_experts * a.r:
            raise ConversionError(f"{name}: lora_A rank {mod['A'][0].shape[0]} differs from r={a.r} of layer {layer}")
        out[f"{name}.molora_A"] = A.contiguous()
        out[f"{name}.molora_B"] = B.contiguous()
        out[f"{name}.molora_router"] = router.contiguous()
        leaf_names.add(rest.rsplit(".", 1)[-1])

    ranks = sorted({x.r for x in alloc})
    config = {
        "peft_type": "MOLORA",
        "task_type": lora_cfg.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": base_model_name_or_path or lora_cfg.get("base_model_name_or_path"),
        "num_experts": [x.num_experts for x in alloc],
        "top_k": [x.top_k for x in alloc],
        "r": ranks[0] if len(ranks) == 1 else [x.r for x in alloc],
        "lora_alpha": alpha,
        "lora_dropout": lora_cfg.get("lora_dropout", 0.0),
        "target_modules": sorted(leaf_names),
        "router": "topk",
        "aux_loss_coef": 0.001,
        "aux_loss_mode": "original",
        "allocation": [{"layer": x.layer, "num_experts": x.num_experts, "top_k": x.top_k, "r": x.r} for x in alloc],
        "num_layers": n_layers,
        "inference_mode": True,
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        save_file(out, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt", "converted_from": "mola"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
