"""lora_fx: LoRA as compiler passes over torch.fx graphs.

model --capture--> GraphModule --inject--> + LoRA branches --(train)--> save_adapter
          (--quantize--> 4-bit base: QLoRA)      |--merge / unmerge--> weights folded in / out
                                                 `--unload / merge_and_unload--> plain graph

The public API: `capture`, the config, the errors, and every pass (`lora_fx.passes.__all__`).
"""

from lora_fx import errors, passes
from lora_fx.capture import capture, capture_for_generation
from lora_fx.config import (
    ArrowConfig,
    BdLoraConfig,
    CordaConfig,
    EvaConfig,
    KasaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
    MontecloraConfig,
    VeloraConfig,
)
from lora_fx.errors import *  # noqa: F403  (every error, listed in lora_fx.errors.__all__)
from lora_fx.generation import generate
from lora_fx.passes import *  # noqa: F403  (the passes, listed once in lora_fx.passes.__all__)

__version__ = "0.1.0"

__all__ = [
    "ArrowConfig",
    "BdLoraConfig",
    "CordaConfig",
    "EvaConfig",
    "KasaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "MontecloraConfig",
    "VeloraConfig",
    "capture",
    "capture_for_generation",
    "generate",
    *errors.__all__,
    *passes.__all__,
]
