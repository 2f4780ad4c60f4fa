"""The passes, in pipeline order: inject -> (train) -> merge / unmerge -> unload."""

from lora_fx.passes._alora import set_alora_offsets
from lora_fx.passes.adapters import (
    active_adapters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
)
from lora_fx.passes.arrow import create_arrow_model
from lora_fx.passes.checkpoint import checkpoint_blocks, checkpointed_blocks, uncheckpoint_blocks
from lora_fx.passes.corda import initialize_corda
from lora_fx.passes.eva import initialize_eva
from lora_fx.passes.files import load_adapter, save_adapter
from lora_fx.passes.hotswap import hotswap_adapter, prepare_for_hotswap
from lora_fx.passes.inject import inject
from lora_fx.passes.kbit import prepare_for_kbit_training
from lora_fx.passes.layout import LAYOUTS, get_layout, set_layout
from lora_fx.passes.lora_ga import initialize_lora_ga
from lora_fx.passes.merge import merge, merge_report, unmerge
from lora_fx.passes.mixed_batch import BASE, adapter_batch, set_adapter_batch
from lora_fx.passes.monteclora import get_monteclora_loss
from lora_fx.passes.quantize import dequantize, quantize
from lora_fx.passes.replicate import replicate_layers
from lora_fx.passes.unload import merge_and_unload, unload
from lora_fx.passes.weighted import COMBINATION_TYPES, add_weighted_adapter

__all__ = [
    "BASE",
    "COMBINATION_TYPES",
    "LAYOUTS",
    "active_adapters",
    "adapter_batch",
    "add_weighted_adapter",
    "checkpoint_blocks",
    "checkpointed_blocks",
    "count_parameters",
    "create_arrow_model",
    "delete_adapter",
    "dequantize",
    "disable_adapters",
    "get_layout",
    "get_monteclora_loss",
    "hotswap_adapter",
    "initialize_corda",
    "initialize_eva",
    "initialize_lora_ga",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "merge_report",
    "prepare_for_hotswap",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "quantize",
    "replicate_layers",
    "save_adapter",
    "set_adapter",
    "set_adapter_batch",
    "set_alora_offsets",
    "set_layout",
    "trainable_parameters",
    "uncheckpoint_blocks",
    "unload",
    "unmerge",
]
