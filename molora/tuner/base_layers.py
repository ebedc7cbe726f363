"""Which base layers MoLoRA wraps, and how to read and write their weight: one dispatcher entry per layer type.

Like PEFT's LoRA dispatchers (``dispatch_bnb_4bit``, ``dispatch_default`` ...), the first entry of
:data:`BASE_LAYERS` that matches a module handles it; quantized types come before ``nn.Linear`` because
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` subclass it. The adapter math never reads the base weight (the
base layer's own forward computes ``base(x)``, the experts are added to it), so an entry only says:

* ``features(base)`` -> ``(d_in, d_out)``;
* ``fan_in_fan_out``: the stored weight is ``[d_in, d_out]`` (GPT-2's ``Conv1D``) rather than ``[d_out, d_in]``;
* ``dequantize(base)`` -> the weight as a float tensor in its stored orientation (merging, references);
* ``replace_weight(base, w)``: store ``w`` (float, stored orientation) back, re-quantizing where needed.

Add a layer type with :func:`register_base_layer`; a module no entry matches is refused naming the module and
the supported types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class BaseLayerType:
    """How MoLoRA treats one kind of base layer (see the module docstring)."""

    name: str
    matches: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], tuple[int, int]]
    dequantize: Callable[[nn.Module], torch.Tensor]
    replace_weight: Callable[[nn.Module, torch.Tensor], None]
    fan_in_fan_out: bool = False
    quantized: bool = False


def _cls_name_in(module: nn.Module, names: tuple[str, ...], package: str) -> bool:
    """``type(module)`` (or a base class) is ``package``'s class of one of these names, without importing it."""
    return any(c.__name__ in names and c.__module__.startswith(package) for c in type(module).__mro__)


# ---------------------------------------------------------------- bitsandbytes (4-bit and 8-bit)
def _bnb_dequantize(base: nn.Module) -> torch.Tensor:
    from peft.utils.integrations import dequantize_bnb_weight

    weight = base.weight
    _unpack_cpu_4bit(base)
    state = getattr(base, "state", None)
    if state is not None and getattr(state, "SCB", None) is None and hasattr(weight, "SCB"):
        state.SCB = weight.SCB
    return dequantize_bnb_weight(weight, state=state if state is not None else getattr(weight, "quant_state", None)).float()


def _unpack_cpu_4bit(base: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight, in place. On CPUs with AVX512-BF16, bitsandbytes 0.50
    rewrites a ``Linear4bit`` weight into a kernel-specific layout at its first forward in eval mode without
    gradients (``quant_state.packing_format_for_cpu``); ``dequantize_4bit`` does not understand that layout and
    returns wrong values (0.18 off on a random 128 x 64 nf4 weight). bitsandbytes undoes it the same way before
    saving; its next eval forward packs the weight again."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        nested = state.original_nested
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        absmax = weight.quant_state.absmax
        if not nested and absmax.dim() == 2:  # 0.50 restores only a double-quantized absmax from its [K/64, N] form
            weight.quant_state.absmax = absmax.T.reshape(-1).float()  # bnb keeps absmax in fp32


def _bnb4_replace(base: nn.Module, w: torch.Tensor) -> None:
    """Re-quantize ``w`` with the layer's quantization settings (quant type, blocksize, double quant)."""
    import bitsandbytes as bnb

    weight = base.weight
    kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs.update(requires_grad=False, bnb_quantized=False)
    kwargs.pop("quant_state", None)
    base.weight = bnb.nn.Params4bit(w.to("cpu", torch.float32).contiguous(), **kwargs).to(weight.device)


def _bnb8_replace(base: nn.Module, w: torch.Tensor) -> None:
    import bitsandbytes as bnb

    weight = base.weight
    base.weight = bnb.nn.Int8Params(w.to("cpu").contiguous(), requires_grad=False,
                                    has_fp16_weights=weight.has_fp16_weights).to(weight.device)
    if getattr(base, "state", None) is not None:
        base.state.reset_grads()


# ---------------------------------------------------------------- plain float layers
def _float_weight(base: nn.Module) -> torch.Tensor:
    """The weight in at least float32 (bf16/fp16 are merged in fp32; a float64 weight stays float64)."""
    w = base.weight.detach()
    return w.to(torch.promote_types(w.dtype, torch.float32))


def _float_replace(base: nn.Module, w: torch.Tensor) -> None:
    base.weight.data = w.to(base.weight.device, base.weight.dtype)


def _conv1d_features(base: nn.Module) -> tuple[int, int]:
    w = base.weight
    d_in, d_out = w.ds_shape if hasattr(w, "ds_shape") else w.shape  # ZeRO-3 keeps the full shape in ds_shape
    return int(d_in), int(d_out)


BASE_LAYERS: list[BaseLayerType] = [
    BaseLayerType("bitsandbytes Linear4bit",
                  matches=lambda m: _cls_name_in(m, ("Linear4bit",), "bitsandbytes"),
                  features=lambda m: (m.in_features, m.out_features),
                  dequantize=_bnb_dequantize, replace_weight=_bnb4_replace, quantized=True),
    BaseLayerType("bitsandbytes Linear8bitLt",
                  matches=lambda m: _cls_name_in(m, ("Linear8bitLt",), "bitsandbytes"),
                  features=lambda m: (m.in_features, m.out_features),
                  dequantize=_bnb_dequantize, replace_weight=_bnb8_replace, quantized=True),
    BaseLayerType("nn.Linear",
                  matches=lambda m: isinstance(m, nn.Linear),
                  features=lambda m: (m.in_features, m.out_features),
                  dequantize=_float_weight, replace_weight=_float_replace),
    BaseLayerType("transformers Conv1D",
                  matches=lambda m: isinstance(m, Conv1D),
                  features=_conv1d_features,
                  dequantize=_float_weight, replace_weight=_float_replace,
                  fan_in_fan_out=True),
]


def register_base_layer(kind: BaseLayerType, first: bool = True) -> None:
    """Add a base layer type (``first``: before the built-in ones, so it wins over ``nn.Linear`` for subclasses)."""
    if any(k.name == kind.name for k in BASE_LAYERS):
        raise ValueError(f"base layer type {kind.name!r} is already registered")
    BASE_LAYERS.insert(0 if first else len(BASE_LAYERS), kind)


def supported_names() -> str:
    return ", ".join(k.name for k in BASE_LAYERS)


def find_base_layer_type(module: nn.Module) -> BaseLayerType | None:
    """The first registered type that matches ``module``, or None."""
    return next((k for k in BASE_LAYERS if k.matches(module)), None)


def base_layer_type(module: nn.Module, where: str = "") -> BaseLayerType:
    """The type entry of ``module``; a ``TypeError`` naming the module and the supported types if none matches."""
    kind = find_base_layer_type(module)
    if kind is None:
        at = f"{where!r} is a " if where else ""
        raise TypeError(f"MoLoRA cannot wrap {at}{type(module).__module__}.{type(module).__name__}; supported base "
                        f"layers: {supported_names()}")
    return kind
