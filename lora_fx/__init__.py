"""lora_fx: LoRA as compiler passes over torch.fx graphs.

model --capture--> GraphModule --inject--> + LoRA branches --(train)--> save_adapter
                                                 |--merge / unmerge--> weights folded in / out
                                                 `--unload / merge_and_unload--> plain graph
"""

from lora_fx.capture import capture
from lora_fx.config import LoraConfig
from lora_fx.errors import (
    AdapterError,
    CaptureError,
    ConfigError,
    LoraFxError,
    MergeError,
    NoTargetMatchedError,
    UnsupportedSiteError,
)
from lora_fx.io import load_adapter, save_adapter
from lora_fx.passes import (
    BASE,
    adapter_batch,
    active_adapters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    hotswap_adapter,
    inject,
    merge,
    merge_and_unload,
    merge_report,
    prepare_for_hotswap,
    print_trainable_parameters,
    set_adapter,
    set_adapter_batch,
    trainable_parameters,
    unload,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [
    "BASE",
    "AdapterError",
    "CaptureError",
    "ConfigError",
    "LoraConfig",
    "LoraFxError",
    "MergeError",
    "NoTargetMatchedError",
    "UnsupportedSiteError",
    "active_adapters",
    "adapter_batch",
    "capture",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "hotswap_adapter",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "merge_report",
    "prepare_for_hotswap",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "set_adapter_batch",
    "trainable_parameters",
    "unload",
    "unmerge",
]
