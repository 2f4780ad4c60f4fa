"""Model-folder workflows: merge a PEFT adapter into a transformers model folder, inspect sites.

    MODEL_DIR + ADAPTER_DIR --load, capture, load_adapter, merge_and_unload--> OUT_DIR

Rules:
1. Everything is read from disk (`local_files_only=True`); nothing is downloaded, and no process
   state (environment, log levels) is changed for it.
2. `MODEL_DIR` is never written. `OUT_DIR` must be empty or absent unless `force=True`; the merged
   model is written to a temporary folder beside it, which then replaces `OUT_DIR` in one step
   (`core/files.py` `replace_folder`: an atomic exchange on Linux, so `OUT_DIR` is the whole old or
   the whole new model at every instant, even if killed; elsewhere the old folder is renamed aside
   first and `OUT_DIR` is absent for that instant). A failure leaves no half-written folder.
3. The captured graph shares its Parameters with the loaded model, so merging writes the merged
   weights into the model, which `save_pretrained` then saves; tokenizer files are copied over.
4. Every check (folders, adapter type, shapes) runs before anything is written; so does the
   check that the merged weights are finite (an adapter with NaN or Inf), which only
   `allow_non_finite=True` skips.
5. Without `progress`, transformers' progress bars (loading weights, writing shards) are off for
   the whole call and exactly as before afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_fx.capture import capture
from lora_fx.config import LoraConfig
from lora_fx.core.files import CONFIG_NAME, make_temp_folder, read_adapter_folder, replace_folder
from lora_fx.errors import AdapterError, LoraFxError, MergeError
from lora_fx.passes.adapters import count_parameters
from lora_fx.passes.files import load_adapter
from lora_fx.passes.inject import inject
from lora_fx.passes.merge import merge_report
from lora_fx.passes.unload import merge_and_unload
from lora_fx.sites import find_sites

__all__ = ["FolderError", "inspect_model_folder", "merge_model_folder"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files a model folder carries beside its weights that a merged folder should keep.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


class FolderError(LoraFxError, ValueError):
    """A model, adapter or output folder is missing, of the wrong kind, or not writable."""


@dataclass
class MergeSummary:
    """What `merge_model_folder` did, for the command line's report."""

    out_dir: str
    sites: int
    worst_rounding_loss: float
    seconds: dict[str, float] = field(default_factory=dict)


def merge_model_folder(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    safe_merge: bool = False,
    force: bool = False,
    progress: bool = False,
    allow_non_finite: bool = False,
) -> MergeSummary:
    """Merge a PEFT LoRA adapter into a transformers model folder and save the result.

    Args:
        model_dir: A folder written by `save_pretrained` (sharded safetensors work).
        adapter_dir: A PEFT adapter folder (`adapter_config.json` + weights).
        out_dir: Where the merged model goes (empty or absent unless `force`).
        dtype: `"float32"`, `"float16"` or `"bfloat16"`; default: the folder's own dtype.
        safe_merge: Check merged weights are finite before writing them.
        force: Replace a non-empty `out_dir`.
        progress: Show a progress bar.
        allow_non_finite: Write the merged model even if the adapter put NaN or Inf into it.

    Returns:
        A `MergeSummary`.

    Raises:
        FolderError: Missing folders, a non-empty `out_dir`, or `out_dir` inside `model_dir`.
        ConfigError: The adapter is not a LoRA adapter.
        AdapterError: The adapter does not fit the model (shapes, names).
        MergeError: The merged weights are not finite (nothing is written).

    Example:
        >>> merge_model_folder("llama", "adapter", "llama-merged", dtype="bfloat16")
    """
    model_path, adapter_path, out_path = Path(model_dir), Path(adapter_dir), Path(out_dir)
    _check_model_folder(model_path)
    if not (adapter_path / CONFIG_NAME).is_file():
        raise FolderError(f"adapter folder {str(adapter_path)!r} has no {CONFIG_NAME}")
    read_adapter_folder(adapter_path)  # the adapter type and files, before the model is loaded
    _check_out_folder(model_path, out_path, force)
    if dtype is not None and dtype not in _DTYPES:
        raise FolderError(f"dtype={dtype!r} is invalid; expected one of {list(_DTYPES)}")

    steps = _Steps(progress, total=5)
    with _progress_bars(progress):
        model = steps.run("load model", lambda: _load_model(model_path, dtype))
        ids = torch.zeros(1, 8, dtype=torch.long)
        gm = steps.run("capture", lambda: capture(model, (ids,), {"use_cache": False}))
        steps.run("load adapter", lambda: load_adapter(gm, adapter_path))
        sites = len(find_sites(gm, LoraConfig.from_json(str(adapter_path / CONFIG_NAME))))
        steps.run("merge", lambda: merge_and_unload(gm, safe_merge=safe_merge))
        report = merge_report(gm)  # kept past the unload
        _check_finite(report, adapter_path, allow_non_finite)
        worst = max((v for v in report.values() if math.isfinite(v)), default=0.0)
        _check_untied(gm, model)
        steps.run("save", lambda: _save(model, model_path, out_path, force))
    steps.close()
    return MergeSummary(str(out_path), sites, worst, steps.seconds)


def inspect_model_folder(model_dir: str | os.PathLike, cfg: LoraConfig) -> dict[str, Any]:
    """The sites `cfg` would adapt in a model folder, with shapes, LoRA sizes and PEFT's figures.

    Returns:
        `{"sites": [{"path", "kind", "in", "out", "r", "lora_params"}], "totals": {...}}`.

    Raises:
        FolderError: `model_dir` is not a model folder.
        NoTargetMatchedError: The config matches nothing (candidate names are listed).

    Example:
        >>> inspect_model_folder("llama", LoraConfig(r=8, target_modules="all-linear"))["totals"]
    """
    model_path = Path(model_dir)
    _check_model_folder(model_path)
    with _progress_bars(False):
        model = _load_model(model_path, None)
    gm = capture(model, (torch.zeros(1, 8, dtype=torch.long),), {"use_cache": False})
    sites = find_sites(gm, cfg)
    rows = []
    for site in sites:
        r = cfg.rank_for(site.fqn)
        rows.append(
            {
                "path": site.fqn,
                "kind": site.kind,
                "in": site.in_features,
                "out": site.out_features,
                "r": r,
                "lora_params": _lora_size(site, r),
            }
        )
    inject(gm, cfg)
    trainable, total = count_parameters(gm)
    totals = {
        "sites": len(rows),
        "lora_params": sum(row["lora_params"] for row in rows),
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
    }
    return {"model": str(model_path), "sites": rows, "totals": totals}


def _lora_size(site, r: int) -> int:
    """Number of A and B entries of one site."""
    if site.conv is not None:
        kernel = 1
        for k in site.conv.kernel_size:
            kernel *= k
        return r * site.in_features * kernel + site.out_features * (r // site.conv.groups)
    return r * (site.in_features + site.out_features)


def _check_model_folder(path: Path) -> None:
    """A model folder exists and has a config.json."""
    if not path.is_dir():
        raise FolderError(f"model folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FolderError(f"{str(path)!r} has no config.json; expected a save_pretrained folder")


def _check_out_folder(model_path: Path, out_path: Path, force: bool) -> None:
    """Never write into the model folder; refuse a non-empty output unless forced."""
    model_abs, out_abs = model_path.resolve(), out_path.resolve()
    if out_abs == model_abs or model_abs in out_abs.parents:
        raise FolderError(f"out folder {str(out_path)!r} is (inside) the model folder")
    if out_path.exists() and not out_path.is_dir():
        raise FolderError(f"out folder {str(out_path)!r} exists and is not a folder")
    if out_path.is_dir() and any(out_path.iterdir()) and not force:
        raise FolderError(f"out folder {str(out_path)!r} is not empty; pass --force to replace it")


def _load_model(path: Path, dtype: str | None):
    """A causal LM from a local folder; `local_files_only` keeps it offline (rule 1)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = _DTYPES[dtype]
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def _check_finite(report: dict[str, float], adapter_path: Path, allowed: bool) -> None:
    """Refuse to write a model that a NaN / Inf adapter made non-finite (the report says NaN)."""
    broken = [site for site, loss in report.items() if not math.isfinite(loss)]
    if broken and not allowed:
        raise MergeError(
            f"the adapter {str(adapter_path)!r} has NaN or Inf weights: merging it made "
            f"{len(broken)} sites non-finite ({broken[:3]}); nothing was written. Pass "
            "--allow-non-finite (allow_non_finite=True) to write the model anyway"
        )


def _check_untied(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """A site merged into a private weight (tied embeddings) cannot be saved in a tied model."""
    model_params = {id(p) for p in model.parameters()}
    private = [n for n, p in gm.named_parameters() if id(p) not in model_params]
    if private:
        raise AdapterError(
            f"the adapter changes tied weights {private[:3]}; a merged model cannot keep the tie. "
            "Untie them in the model (config.tie_word_embeddings=False) before merging"
        )


def _save(model, model_path: Path, out_path: Path, force: bool) -> None:
    """save_pretrained to a temp folder beside out_path, add tokenizer files, swap in (rule 2)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_folder(out_path)
    try:
        model.save_pretrained(str(tmp))
        for name in _TOKENIZER_FILES:
            if (model_path / name).is_file():
                shutil.copy2(model_path / name, tmp / name)
        if out_path.exists() and not force and any(out_path.iterdir()):
            raise FolderError(f"out folder {str(out_path)!r} is not empty")
        replace_folder(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """Progress bars of transformers and huggingface_hub off in the block unless `enabled`."""
    if enabled:  # never switched on: a user who turned them off keeps them off
        yield
        return
    from transformers.utils import logging as hf_logging

    # huggingface_hub.utils re-exports the class `tqdm`, which hides its module of that name.
    hub_states = getattr(
        importlib.import_module("huggingface_hub.utils.tqdm"), "progress_bar_states", {}
    )
    was_on, saved = hf_logging.is_progress_bar_enabled(), dict(hub_states)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        hub_states.clear()
        hub_states.update(saved)


class _Steps:
    """Times named steps and shows them on a tqdm bar when asked."""

    def __init__(self, progress: bool, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not progress, desc="merge", unit="step")
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn):
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        result = fn()
        self.seconds[name] = time.perf_counter() - start
        self.bar.update(1)
        return result

    def close(self) -> None:
        self.bar.close()
