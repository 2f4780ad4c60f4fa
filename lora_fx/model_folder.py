"""`lora_fx.model_folder`, kept at this path: the code is `lora_fx.cli.model_folder`."""

from lora_fx.cli.model_folder import (
    FolderError,
    MergeSummary,
    inspect_model_folder,
    merge_model_folder,
)

__all__ = ["FolderError", "MergeSummary", "inspect_model_folder", "merge_model_folder"]
