"""lora_fx: LoRA as compiler passes over torch.fx graphs.

model --capture--> GraphModule --inject--> + LoRA branches --(train)--> save_adapter
          (--quantize--> 4-bit base: QLoRA)      |--merge / unmerge--> weights folded in / out
                                                 `--unload / merge_and_unload--> plain graph
"""

from lora_fx.capture import capture
from lora_fx.config import LoftQConfig, LoraConfig
from lora_fx.errors import (
    AdapterError,
    CaptureError,
    ConfigError,
    LoraFxError,
    MergeError,
    NoTargetMatchedError,
    ReplicationError,
    UnsupportedSiteError,
)
from lora_fx.passes import (
    BASE,
    COMBINATION_TYPES,
    LAYOUTS,
    active_adapters,
    adapter_batch,
    add_weighted_adapter,
    checkpoint_blocks,
    checkpointed_blocks,
    count_parameters,
    delete_adapter,
    dequantize,
    disable_adapters,
    get_layout,
    hotswap_adapter,
    inject,
    merge,
    merge_and_unload,
    merge_report,
    prepare_for_hotswap,
    print_trainable_parameters,
    quantize,
    replicate_layers,
    set_adapter,
    set_adapter_batch,
    set_layout,
    trainable_parameters,
    uncheckpoint_blocks,
    unload,
    unmerge,
)
from lora_fx.passes.files import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "BASE",
    "COMBINATION_TYPES",
    "LAYOUTS",
    "AdapterError",
    "CaptureError",
    "ConfigError",
    "LoftQConfig",
    "LoraConfig",
    "LoraFxError",
    "MergeError",
    "NoTargetMatchedError",
    "ReplicationError",
    "UnsupportedSiteError",
    "active_adapters",
    "adapter_batch",
    "add_weighted_adapter",
    "capture",
    "checkpoint_blocks",
    "checkpointed_blocks",
    "count_parameters",
    "delete_adapter",
    "dequantize",
    "disable_adapters",
    "get_layout",
    "hotswap_adapter",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "merge_report",
    "prepare_for_hotswap",
    "print_trainable_parameters",
    "quantize",
    "replicate_layers",
    "save_adapter",
    "set_adapter",
    "set_adapter_batch",
    "set_layout",
    "trainable_parameters",
    "uncheckpoint_blocks",
    "unload",
    "unmerge",
]
