"""`lora-fx export-onnx`: a transformers model (or the embedded tiny Llama) and adapters to ONNX.

    load model -> capture(input_ids) -> load_adapter per --adapter -> export_onnx -> (adapter files)
        -> onnxruntime check -> files moved into place -> summary   (arguments: lora_fx/cli.py)

Rules:
1. `--model` is a local transformers folder (`config.json` + weights; nothing is downloaded);
   without it, a tiny Llama is built from a config with seeded random weights.
2. The model is captured with `input_ids` of `--batch` x `--seq-len` (dynamic batch and sequence
   unless `--static`), `use_cache=False` when the model takes it, in `--dtype`.
3. `--adapter [NAME=]DIR` loads a PEFT folder (repeatable; NAME defaults to the folder name).
   Merged exports fold every adapter; `--layout inputs` also writes one `.onnx_adapter` per adapter
   beside the model; `--layout stacked` serves them per row.
4. Unless `--no-check`, onnxruntime runs the file once on CPU and its outputs are compared with
   torch. A file it cannot run (bfloat16: its CPU provider lacks most kernels) is an error, exit
   code 2, and nothing is written; without onnxruntime installed the check is reported "not run".
5. Files are written into a temporary folder beside `--out` and moved into place only when the
   export and the check succeeded. An existing `--out` (or its data or adapter files) is refused
   unless `--force`; a missing folder of `--out` is created (and removed again on failure).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from lora_fx.core.files import make_temp_folder
from lora_fx.errors import OnnxExportError

__all__ = ["run_export_onnx"]

log = logging.getLogger(__name__)


def run_export_onnx(args: argparse.Namespace) -> int:
    """Load, capture, load adapters, export, check; print a summary. Returns the exit code."""
    import torch

    import lora_fx
    from lora_fx.exporters.onnx import export_onnx

    layout = args.layout or ("initializers" if args.unmerged else "merged")
    if args.unmerged and layout == "merged":
        raise ValueError("--unmerged contradicts --layout merged")
    if args.genai:
        return _run_genai(args, layout)
    out = Path(args.out)
    adapters = [_adapter_arg(text) for text in args.adapter]
    adapter_names = [f"{out.stem}.{name}.onnx_adapter" for name, _ in adapters]
    if layout != "inputs":
        adapter_names = []
    _check_out(out, [f"{out.name}.data", *adapter_names], force=args.force)  # before loading
    start = time.perf_counter()

    model, source = _load_model(args.model, getattr(torch, args.dtype))
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise ValueError(f"{source} has no vocab_size; the CLI exports text models (input_ids)")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator)
    kwargs, dynamic = _capture_inputs(model, args.static)
    gm = lora_fx.capture(model, (ids,), kwargs, dynamic_shapes=dynamic)
    for name, folder in adapters:
        lora_fx.load_adapter(gm, folder, adapter_name=name)
    if adapters:
        lora_fx.set_adapter(gm, [name for name, _ in adapters])  # merged: fold them all
    gm.eval()

    with _staged(out) as stage:
        result = export_onnx(
            gm,
            (ids,),
            stage / out.name,
            merged=layout == "merged",
            lora_layout="initializers" if layout == "merged" else layout,
            opset=args.opset,
            optimize=not args.no_optimize,
            external_data=True if args.external_data else None,
        )
        staged_adapters = [stage / name for name in adapter_names]
        for (name, _), path in zip(adapters, staged_adapters, strict=True):
            _write_adapter(gm, path, name, result.path)
        check = None
        if not args.no_check:
            check = _checked(gm, ids, result, adapters, staged_adapters, dtype=args.dtype)

    data_path = out.with_name(result.data_path.name) if result.data_path else None
    result = dataclasses.replace(result, path=out, data_path=data_path)
    adapter_files = [out.with_name(name) for name in adapter_names]
    _print_summary(result, source, adapters, adapter_files, check, time.perf_counter() - start)
    return 0


def _run_genai(args: argparse.Namespace, layout: str) -> int:
    """`--genai OUT_DIR`: capture for generation, load adapters, `export_genai`, summary."""
    import torch

    import lora_fx
    from lora_fx.exporters.genai import export_genai

    if layout not in ("merged", "inputs"):
        raise ValueError(
            f"--genai serves --layout merged or inputs (adapters chosen per request), "
            f"not {layout!r}"
        )
    out = Path(args.genai)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise OnnxExportError(f"{str(out)!r} exists and is not empty; pass --force to replace it")
    adapters = [_adapter_arg(text) for text in args.adapter]
    if layout == "inputs" and not adapters:
        raise ValueError("--layout inputs with --genai needs at least one --adapter")
    start = time.perf_counter()
    model, source = _load_model(args.model, getattr(torch, args.dtype))
    gm = lora_fx.capture_for_generation(
        model, max_batch_size=args.batch, max_cache_len=args.context_length
    )
    for name, folder in adapters:
        lora_fx.load_adapter(gm, folder, adapter_name=name)
    if adapters:
        lora_fx.set_adapter(gm, [name for name, _ in adapters])  # merged: fold them all
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = args.model if args.model and _has_tokenizer(Path(args.model)) else None
    result = export_genai(
        gm,
        out,
        merged=layout == "merged",
        tokenizer_dir=tokenizer,
        opset=args.opset,
        overwrite=args.force,
    )
    seconds = time.perf_counter() - start
    print(f"wrote {result.folder} for onnxruntime-genai in {seconds:.1f} s")
    print(f"  model           {source}")
    print(f"  genai type      {result.config['model']['type']}, context {args.context_length}")
    print(f"  layout          {result.model.layout}, adapters {list(result.model.adapters)}")
    for name, path in result.adapters.items():
        print(f"  ORT adapter     {name}: {path}")
    tokenizer_files = ", ".join(result.tokenizer_files) or "none (no tokenizer in --model)"
    print(f"  tokenizer       {tokenizer_files}")
    return 0


def _has_tokenizer(folder: Path) -> bool:
    """Whether a model folder holds tokenizer files to copy."""
    from lora_fx.exporters.genai import TOKENIZER_FILES

    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _check_out(out: Path, siblings: list[str], *, force: bool) -> None:
    """Refuse a folder, an unwritable place, or existing files unless `force` (rule 5)."""
    if out.is_dir():
        raise OnnxExportError(f"cannot write {str(out)!r}: it is a folder; give a file name")
    existing_folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not existing_folder.is_dir():
        raise OnnxExportError(
            f"cannot write {str(out)!r}: {str(existing_folder)!r} is a file, not a folder"
        )
    if not os.access(existing_folder, os.W_OK):
        raise OnnxExportError(
            f"cannot write {str(out)!r}: folder {str(existing_folder)!r} is not writable"
        )
    existing = [str(p) for p in (out, *(out.with_name(name) for name in siblings)) if p.exists()]
    if existing and not force:
        verb, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
        raise OnnxExportError(
            f"{', '.join(map(repr, existing))} {verb}; pass --force to replace {them}"
        )


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, whose files are moved beside `out` if the block succeeds."""
    from lora_fx.exporters._onnx_ir import install_onnx
    from lora_fx.exporters.ort import ADAPTER_SUFFIX

    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = make_temp_folder(out)
    try:
        yield stage
        for file in stage.iterdir():  # adapter files; the .onnx and its data file last
            if file.name.endswith(ADAPTER_SUFFIX):
                os.replace(file, out.parent / file.name)
        install_onnx(stage / out.name, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _checked(gm, ids, result, adapters, adapter_files, *, dtype: str) -> tuple[float, str]:
    """`_check`, with a file onnxruntime cannot run made an error (rule 4)."""
    try:
        return _check(gm, ids, result, adapters, adapter_files)
    except ImportError as e:
        return float("nan"), f"not run: {e.name or 'onnxruntime'} is not installed"
    except Exception as e:
        hint = " Pass --no-check to write it anyway."
        if dtype == "bfloat16":
            hint = (
                " onnxruntime's CPU provider has no bfloat16 kernel for most ops: use --dtype "
                "float16 or float32, or pass --no-check to write the file for another runtime."
            )
        reason = " ".join(str(e).split())[:200]
        raise OnnxExportError(
            f"onnxruntime cannot run the exported model on CPU, so nothing was written: "
            f"{type(e).__name__}: {reason}.{hint}"
        ) from e


def _adapter_arg(text: str) -> tuple[str, Path]:
    """`NAME=DIR` or `DIR` (name: the folder's name, made an identifier)."""
    name, sep, folder = text.partition("=")
    if not sep:
        folder, name = text, Path(text).resolve().name
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "default"
    if name[0].isdigit():
        name = f"adapter_{name}"
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {folder!r} does not exist")
    return name, path


def _load_model(folder: str | None, dtype):
    """A transformers model from a local folder, or the embedded tiny Llama; in eval mode."""
    import torch
    import transformers

    if folder is None:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        model = transformers.LlamaForCausalLM(config)
        source = "embedded tiny Llama (random weights, 2 layers, hidden 64)"
    else:
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder!r} is not a transformers model folder (no config.json); "
                "omit --model for the embedded tiny default"
            )
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        arch = (config.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        model = cls.from_pretrained(path, local_files_only=True)
        source = f"{type(model).__name__} from {folder}"
    return model.to(dtype).eval(), source


def _capture_inputs(model, static: bool):
    """Capture kwargs (`use_cache=False` when taken) and dynamic batch/sequence shapes."""
    import inspect

    from torch.export import Dim

    takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    kwargs = {"use_cache": False} if takes_cache else {}
    if static:
        return kwargs, None
    first = next(iter(inspect.signature(model.forward).parameters))
    shapes = {first: {0: Dim("batch"), 1: Dim("sequence")}}
    if takes_cache:
        shapes["use_cache"] = None
    return kwargs, shapes


def _write_adapter(gm, path: Path, name: str, model: Path) -> None:
    """The ONNX Runtime adapter file of one graph adapter."""
    from lora_fx.exporters.ort import write_ort_adapter

    write_ort_adapter(gm, path, name, model=model)


def _check(gm, ids, result, adapters, adapter_files) -> tuple[float, str]:
    """Max |onnxruntime - torch| over the outputs, and what was compared."""
    import numpy as np
    import torch

    import lora_fx
    from lora_fx.exporters.ort import ort_run_options, ort_session

    session = ort_session(result.path, device="cpu")
    feed = {result.inputs[0]: ids.numpy()}
    options = None
    what = "merged"
    if result.layout == "inputs" and adapter_files:
        options = ort_run_options(adapter_files[0])
        what = f"adapter {adapters[0][0]!r} via RunOptions"
        lora_fx.set_adapter(gm, adapters[0][0])
    elif result.layout == "stacked":
        feed["adapter_index"] = np.zeros(ids.shape[0], dtype=np.int64)
        what = f"every row on adapter {result.adapters[0]!r}"
        lora_fx.set_adapter(gm, result.adapters[0])
    elif result.layout == "inputs":
        what = "no adapter (base)"
    elif result.layout == "initializers":
        what = "LoRA branches"
    with torch.no_grad():
        expected = gm(ids)
    expected = _tensors(expected)
    actual = session.run(None, feed, options)
    diff = max(
        float(np.abs(a.astype(np.float32) - e.float().numpy()).max())
        for a, e in zip(actual, expected, strict=False)
    )
    return diff, what


def _tensors(value) -> list:
    """The tensors of a model output (a tensor, a tuple or a transformers ModelOutput)."""
    import torch
    from torch.utils import _pytree as pytree

    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _print_summary(result, source, adapters, adapter_files, check, seconds: float) -> None:
    """What was written, in a few lines."""
    size = result.nbytes / 1e6
    print(f"wrote {result.path} ({size:.1f} MB, opset {result.opset}) in {seconds:.1f} s")
    if result.data_path:
        print(f"  external data   {result.data_path}")
    print(f"  model           {source}")
    names = ", ".join(f"{n} ({d})" for n, d in adapters) or "none"
    print(f"  adapters        {names}")
    nodes = sum(result.op_counts.values())
    layout = {
        "merged": "merged into the weights: no LoRA node",
        "initializers": "LoRA branches kept; A/B initializers <site>.lora_A.<adapter>.weight",
        "inputs": "LoRA A/B are graph inputs <site>.lora_A.weight (zero-rank default = base)",
        "stacked": "all adapters stacked; input adapter_index picks one per row (-1 = base)",
    }[result.layout]
    print(f"  layout          {result.layout}: {layout}")
    print(f"  graph           {nodes} ONNX nodes, {len(result.lora_tensors)} LoRA tensors")
    print(f"  inputs          {', '.join(result.inputs)}")
    print(f"  outputs         {', '.join(result.outputs)}")
    for path in adapter_files:
        print(f"  ORT adapter     {path}")
    if check is not None and check[0] == check[0]:
        print(f"  check           onnxruntime vs torch ({check[1]}): max |diff| {check[0]:.2e}")
    elif check is not None:
        print(f"  check           {check[1]}")
