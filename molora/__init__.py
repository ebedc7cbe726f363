"""molora: mixtures of LoRA experts with layer-wise expert allocation, as a PEFT method.

    import molora                      # registers the PEFT method "molora"
    from peft import get_peft_model
    model = get_peft_model(base, molora.MoLoRAConfig(num_experts="2,4,6,8", top_k=2, r=8))
    print(molora.allocation_table(model))

Importing the package registers the method with PEFT, which imports torch, transformers and peft (seconds).
The ``molora`` command sets ``MOLORA_DEFER_IMPORT=1`` while it imports the package, so that a bad recipe or
command line fails in well under a second; the first use of any name below then finishes the import.
"""
import os as _os
import warnings as _warnings

# bitsandbytes (imported by PEFT when installed) decorates a few functions with ``torch.jit.script_method``,
# which torch 2.10+ marks deprecated: ten identical notices per process that a user cannot act on.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)


def _quiet_bnb_hub_kernel_notice() -> None:
    """bitsandbytes 0.50, imported on CPUs with AVX512-BF16, tries to fetch a 4-bit GEMM from the Hugging Face Hub
    (``kernels`` package) and logs "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install
    kernels" when it cannot: on every ``import molora`` (PEFT imports bitsandbytes), for runs that do not quantize
    at all. molora never fetches from a hub and bitsandbytes falls back to its own CPU kernel, so the notice is
    dropped; every other message of that logger stays."""
    import logging

    class _DropHubKernelNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "kernels-community" not in str(record.msg)

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelNotice())


_quiet_bnb_hub_kernel_notice()

from ._moved import install as _install_moved_paths

_install_moved_paths()  # the flat 0.1 import paths (molora.config, molora.train, ...) keep working until 0.3

__version__ = "0.2.0"
__all__ = ["MoLoRAConfig", "MoLoRAModel", "MoLoRALayer", "MoLoRALinear", "AllocationError", "RoutedMergeError",
           "PRESETS", "resolve_allocation", "allocation_table", "router_summary"]


def _load() -> None:
    """Register the PEFT method and bind the public names (idempotent)."""
    from .allocation import PRESETS, AllocationError, resolve_allocation
    from .tuner.config import MoLoRAConfig
    from .tuner.layer import Linear as MoLoRALinear, MoLoRALayer, RoutedMergeError
    from .tuner.model import MoLoRAModel
    from .tuner.registry import register
    from .tuner.summary import allocation_table, router_summary

    register()
    globals().update(PRESETS=PRESETS, AllocationError=AllocationError, resolve_allocation=resolve_allocation,
                     MoLoRAConfig=MoLoRAConfig, MoLoRALinear=MoLoRALinear, MoLoRALayer=MoLoRALayer,
                     RoutedMergeError=RoutedMergeError, MoLoRAModel=MoLoRAModel, allocation_table=allocation_table,
                     router_summary=router_summary)


def register() -> None:
    """Register the method with PEFT. ``import molora`` does it, except under ``MOLORA_DEFER_IMPORT=1`` (the
    ``molora`` command), where the first public name used -- or this call -- does."""
    _load()


def __getattr__(name: str):
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'molora' has no attribute {name!r}")


if _os.environ.get("MOLORA_DEFER_IMPORT") != "1":
    _load()
