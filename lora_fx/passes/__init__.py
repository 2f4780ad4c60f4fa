"""The passes, in pipeline order: inject -> (train) -> merge / unmerge -> unload / merge_and_unload."""

from lora_fx.passes.adapters import (
    count_parameters,
    print_trainable_parameters,
    trainable_parameters,
)
from lora_fx.passes.inject import inject
from lora_fx.passes.merge import merge, merge_report, unmerge
from lora_fx.passes.unload import merge_and_unload, unload

__all__ = [
    "count_parameters",
    "inject",
    "merge",
    "merge_and_unload",
    "merge_report",
    "print_trainable_parameters",
    "trainable_parameters",
    "unload",
    "unmerge",
]
