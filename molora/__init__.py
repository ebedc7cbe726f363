"""molora: mixtures of LoRA experts with layer-wise expert allocation, as a PEFT method.

    import molora                      # registers the PEFT method "molora"
    from peft import get_peft_model
    model = get_peft_model(base, molora.MoLoRAConfig(num_experts="2,4,6,8", top_k=2, r=8))
    print(molora.allocation_table(model))
"""
from .registry import register as _register

_register()

from .allocation import PRESETS, AllocationError, resolve_allocation  # noqa: E402
from .config import MoLoRAConfig  # noqa: E402
from .layer import Linear as MoLoRALinear, MoLoRALayer, RoutedMergeError  # noqa: E402
from .model import MoLoRAModel  # noqa: E402
from .summary import allocation_table, router_summary  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MoLoRAConfig", "MoLoRAModel", "MoLoRALayer", "MoLoRALinear", "AllocationError", "RoutedMergeError",
           "PRESETS", "resolve_allocation", "allocation_table", "router_summary"]
