"""A folder onnxruntime-genai loads: a `with_past` decoder, `genai_config.json`, tokenizer files.

    gm (capture_for_generation) --export_genai--> out_dir/
        model.onnx (+ model.onnx.<hex>.data)   export_onnx(..., with_past=True)
        genai_config.json                      sizes, names, token ids, search defaults
        tokenizer.json, ...                    copied from `tokenizer_dir` when given
        <adapter>.onnx_adapter                 merged=False only: one per adapter

    model = og.Model(out_dir)                                   # merged: the adapters are in it
    adapters = og.Adapters(model); adapters.load(out_dir / "a.onnx_adapter", "a")
    generator.set_active_adapter(adapters, "a")                 # merged=False: chosen per request

Rules:
1. `model.type` is the graph's `model_type` when onnxruntime-genai runs it as a plain decoder
   (`GENAI_MODEL_TYPES`: llama, mistral, qwen2), else `"decoder"`, genai's generic decoder-only
   type (GPT-2: genai's "gpt2" type expects another graph). The decoder's names and sizes are
   written explicitly, so genai takes nothing from the type but defaults.
2. `context_length` and `search.max_length` are the capture's `max_cache_len`. The cache is not
   shared between past and present (`past_present_share_buffer: false`): the file's present
   outputs are `cat(past, new)`, one token longer than their past.
3. `merged=True` folds the graph's active adapters into the weights. `merged=False` exports the
   "inputs" layout (LoRA A/B as graph inputs, zero-rank defaults = the base model) and writes one
   `.onnx_adapter` per adapter, checked against the model (`write_ort_adapter(model=...)`).
4. Everything is written into a temporary folder beside `out_dir` and moved into place when
   complete; an existing non-empty `out_dir` is refused unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.fx

from lora_fx.capture import as_graph_module
from lora_fx.capture.generation import GenerationSpec
from lora_fx.core.files import make_temp_folder
from lora_fx.core.state import state_or_none
from lora_fx.errors import AdapterError, OnnxExportError
from lora_fx.exporters._with_past import require_generation_spec
from lora_fx.exporters.onnx import OnnxExport, export_onnx
from lora_fx.exporters.ort import ADAPTER_SUFFIX, write_ort_adapter

__all__ = [
    "GENAI_MODEL_TYPES",
    "TOKENIZER_FILES",
    "GenaiExport",
    "export_genai",
    "genai_config",
]

log = logging.getLogger(__name__)

# `model_type`s written as such: onnxruntime-genai 0.18 runs them with its decoder pipeline and
# the names given (tests check each). Others are written as "decoder": genai's own "gpt2" type
# expects another graph (it asks for an input with an empty name).
GENAI_MODEL_TYPES = ("llama", "mistral", "qwen2")
MODEL_FILE = "model.onnx"
CONFIG_FILE = "genai_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class GenaiExport:
    """What `export_genai` wrote.

    Attributes:
        folder: The folder `onnxruntime_genai.Model` loads.
        model: The decoder's `OnnxExport` (paths inside `folder`).
        config: `genai_config.json` as written.
        adapters: Adapter name -> its `.onnx_adapter` file (merged=False only).
        tokenizer_files: Tokenizer files copied into the folder.
    """

    folder: Path
    model: OnnxExport
    config: dict[str, Any]
    adapters: dict[str, Path]
    tokenizer_files: tuple[str, ...]


def export_genai(
    gm: torch.fx.GraphModule,
    out_dir: str | os.PathLike,
    *,
    merged: bool = True,
    adapter_names: str | list[str] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    search: dict[str, Any] | None = None,
    opset: int | None = None,
    overwrite: bool = False,
) -> GenaiExport:
    """Write a folder that `onnxruntime_genai.Model(out_dir)` loads; the graph is left as it was.

    Args:
        gm: A graph from `lora_fx.capture_for_generation`, with or without adapters.
        out_dir: The folder to write (created; its parent must exist).
        merged: Fold the active adapters into the weights. False: LoRA A/B as graph inputs and
            one `<adapter>.onnx_adapter` per adapter, chosen per request (rule 3).
        adapter_names: Adapters to fold (merged) or to write files for (default: the active ones
            when merged, every adapter otherwise).
        tokenizer_dir: A folder with the model's tokenizer files (usually the model folder); they
            are copied so that `og.Tokenizer(model)` works.
        search: Overrides of `genai_config.json`'s `search` section (e.g. `{"top_k": 1}`).
        opset: ONNX opset (default: torch's).
        overwrite: Replace an existing non-empty `out_dir`.

    Returns:
        A `GenaiExport` describing the folder.

    Raises:
        OnnxExportError: The graph is not from `capture_for_generation`, `out_dir` exists and is
            not empty (without `overwrite`), or the export failed.
        AdapterError: `merged=False` on a graph without adapters, or unknown adapters.

    Example:
        >>> gm = lora_fx.capture_for_generation(model, max_cache_len=512)
        >>> lora_fx.load_adapter(gm, "adapter_a", "a"); lora_fx.load_adapter(gm, "adapter_b", "b")
        >>> lora_fx.exporters.export_genai(gm, "genai_out", merged=False, tokenizer_dir="model/")
    """
    # plan
    gm = as_graph_module(gm)
    spec = require_generation_spec(gm)
    target = _check_out_dir(Path(out_dir), overwrite)
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    layout = "initializers" if merged else "inputs"
    if not merged and state_or_none(gm) is None:
        raise AdapterError(
            "export_genai(merged=False) serves adapters chosen per request, but the graph has "
            "none; load one with lora_fx.load_adapter, or export merged=True"
        )

    # apply
    stage = make_temp_folder(target)
    try:
        model = export_onnx(
            gm,
            None,
            stage / MODEL_FILE,
            merged=merged,
            lora_layout=layout,
            adapter_names=adapter_names,
            opset=opset,
            with_past=True,
        )
        adapters = {}
        if not merged:
            for name in model.adapters:
                path = stage / f"{name}{ADAPTER_SUFFIX}"
                write_ort_adapter(gm, path, name, model=model.path)
                adapters[name] = target / path.name
        config = genai_config(spec, search=search)
        (stage / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n")
        for file in tokenizer_files:
            shutil.copyfile(file, stage / file.name)
        _install(stage, target, overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

    # finish
    data = target / model.data_path.name if model.data_path else None
    result = GenaiExport(
        folder=target,
        model=dataclasses.replace(model, path=target / MODEL_FILE, data_path=data),
        config=config,
        adapters=adapters,
        tokenizer_files=tuple(f.name for f in tokenizer_files),
    )
    log.info(
        "export_genai: %s (%s), %d adapter files, %d tokenizer files -> %s",
        config["model"]["type"],
        model.layout,
        len(adapters),
        len(tokenizer_files),
        target,
    )
    return result


def genai_config(spec: GenerationSpec, *, search: dict[str, Any] | None = None) -> dict[str, Any]:
    """`genai_config.json` for a `with_past` export of a graph with this spec (rules 1, 2).

    Example:
        >>> genai_config(gm.meta["lora_fx_generation"])["model"]["context_length"]
        256
    """
    eos = list(spec.eos_token_id)
    pad = spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0)
    model_type = spec.model_type if spec.model_type in GENAI_MODEL_TYPES else "decoder"
    model: dict[str, Any] = {
        "type": model_type,
        "context_length": spec.max_cache_len,
        "vocab_size": spec.vocab_size,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": MODEL_FILE,
            "head_size": spec.head_dim,
            "hidden_size": spec.hidden_size,
            "num_attention_heads": spec.num_attention_heads,
            "num_hidden_layers": spec.num_layers,
            "num_key_value_heads": spec.num_kv_heads,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
        },
    }
    if spec.bos_token_id is not None:
        model["bos_token_id"] = spec.bos_token_id
    defaults = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": spec.max_cache_len,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    return {"model": model, "search": {**defaults, **(search or {})}}


def _check_out_dir(target: Path, overwrite: bool) -> Path:
    """Refuse a non-empty folder (unless `overwrite`), a file, or a missing parent (rule 4)."""
    if not target.parent.is_dir():
        raise OnnxExportError(
            f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist"
        )
    if target.exists() and not target.is_dir():
        raise OnnxExportError(f"cannot write {str(target)!r}: it is a file; give a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OnnxExportError(
            f"{str(target)!r} exists and is not empty; pass overwrite=True to replace it"
        )
    return target


def _tokenizer_files(folder: str | os.PathLike | None) -> list[Path]:
    """The tokenizer files of `folder` (none found: an error, as the caller expects some)."""
    if folder is None:
        return []
    path = Path(folder)
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise OnnxExportError(
            f"tokenizer_dir={str(path)!r} has no tokenizer files (looked for "
            f"{list(TOKENIZER_FILES[:3])}, ...); save the tokenizer there with "
            "tokenizer.save_pretrained, or omit tokenizer_dir"
        )
    return files


def _install(stage: Path, target: Path, overwrite: bool) -> None:
    """Move the staged folder to `target`, replacing an existing one only with `overwrite`."""
    old = None
    if target.exists():
        if not overwrite and any(target.iterdir()):
            raise OnnxExportError(f"{str(target)!r} appeared while exporting; nothing was written")
        old = make_temp_folder(target)
        os.replace(target, old / target.name)
    os.replace(stage, target)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
