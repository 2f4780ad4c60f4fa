"""The passes, in pipeline order: inject -> (train) -> merge / unmerge -> unload."""

from lora_fx.passes.adapters import (
    active_adapters,
    count_parameters,
    delete_adapter,
    disable_adapters,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
)
from lora_fx.passes.inject import inject
from lora_fx.passes.merge import merge, merge_report, unmerge
from lora_fx.passes.unload import merge_and_unload, unload

__all__ = [
    "active_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "merge",
    "merge_and_unload",
    "merge_report",
    "print_trainable_parameters",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
