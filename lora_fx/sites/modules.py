"""Which modules of a model are sites, by type: what names sites and what `all-linear` takes.

A module is a site module when it is an instance of a site kind's module class (subclasses
included: `GemmaTextScaledWordEmbedding` is an `nn.Embedding`, bitsandbytes' `Linear4bit` an
`nn.Linear`), or transformers' `Conv1D`. `capture` records, for the model, the classes that are
site modules (`gm.meta[CAPTURE_META]["site_classes"]`, as export's `nn_module_stack` spells them:
the stack keeps class names, not types) and their paths (`"site_modules"`, for fx graphs, whose
functional ops carry no stack). An op is named after the innermost site module it runs in.
Without a record (a graph captured elsewhere) the class names below stand in.
"""

from __future__ import annotations

from typing import Any

import torch.fx
from torch import nn

from lora_fx.core.state import CAPTURE_META

__all__ = ["is_site_module", "is_site_module_path", "module_kind", "site_modules"]

# Module classes of each kind, checked with isinstance (PEFT dispatches the same way).
_MODULE_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (nn.Linear, "linear"),
    (nn.Embedding, "embedding"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),  # not ConvTranspose: no conv site
)
# Stand-ins when no record exists: class names as export's stack writes them.
_FALLBACK_CLASS_NAMES = {
    "Linear": "linear",
    "Conv1D": "linear",
    "Conv1d": "conv",
    "Conv2d": "conv",
    "Conv3d": "conv",
    "Embedding": "embedding",
}


def module_kind(module: nn.Module) -> str | None:
    """The site kind a module is (`"linear"`, `"embedding"`, `"conv"`), or None."""
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    if any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
        for c in type(module).__mro__
    ):
        return "linear"  # transformers' Conv1D is an nn.Module, stored [in, out]
    return None


def site_modules(model: nn.Module) -> dict[str, dict[str, str]]:
    """The capture record's entries: `{"site_modules": {path: kind}, "site_classes": {...}}`."""
    paths, classes = {}, {}
    for path, module in model.named_modules():
        kind = module_kind(module) if path else None
        if kind is not None:
            paths[path] = kind
            cls = type(module)
            classes[f"{cls.__module__}.{cls.__qualname__}"] = kind
    return {"site_modules": paths, "site_classes": classes}


def is_site_module(gm: torch.fx.GraphModule, path: str, cls: Any) -> bool:
    """Whether the stack entry `(path, cls)` of an op is a site module of `gm`'s model."""
    if not path:
        return False
    if not isinstance(cls, str):
        cls = f"{cls.__module__}.{cls.__qualname__}"
    recorded = gm.meta.get(CAPTURE_META, {}).get("site_classes")
    if recorded is not None:
        return cls in recorded
    return cls.rsplit(".", 1)[-1] in _FALLBACK_CLASS_NAMES


def is_site_module_path(gm: torch.fx.GraphModule, path: str) -> bool | None:
    """Whether `path` was a site module of the captured model (None: no record to tell)."""
    recorded = gm.meta.get(CAPTURE_META, {}).get("site_modules")
    return None if recorded is None else path in recorded
