"""`lora-fx export-onnx`: a transformers model (or the embedded tiny Llama) and adapters to ONNX.

    load model -> capture(input_ids) -> load_adapter per --adapter -> export_onnx -> (adapter files)
        -> onnxruntime check -> summary          (arguments: `_add_export_onnx` in lora_fx/cli.py)

Rules:
1. `--model` is a local transformers folder (`config.json` + weights; nothing is downloaded);
   without it, a tiny Llama is built from a config with seeded random weights.
2. The model is captured with `input_ids` of `--batch` x `--seq-len` (dynamic batch and sequence
   unless `--static`), `use_cache=False` when the model takes it, in `--dtype`.
3. `--adapter [NAME=]DIR` loads a PEFT folder (repeatable; NAME defaults to the folder name).
   Merged exports fold every adapter; `--layout inputs` also writes one `.onnx_adapter` per adapter
   beside the model; `--layout stacked` serves them per row.
4. Unless `--no-check`, onnxruntime runs the file once and its outputs are compared with torch.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

__all__ = ["run_export_onnx"]

log = logging.getLogger(__name__)


def run_export_onnx(args: argparse.Namespace) -> int:
    """Load, capture, load adapters, export, check; print a summary. Returns the exit code."""
    import torch

    import lora_fx
    from lora_fx.exporters.onnx import _check_target, export_onnx

    layout = args.layout or ("initializers" if args.unmerged else "merged")
    if args.unmerged and layout == "merged":
        raise ValueError("--unmerged contradicts --layout merged")
    out = _check_target(args.out)  # before loading anything
    adapters = [_adapter_arg(text) for text in args.adapter]
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

    result = export_onnx(
        gm,
        (ids,),
        out,
        merged=layout == "merged",
        lora_layout="initializers" if layout == "merged" else layout,
        opset=args.opset,
        optimize=not args.no_optimize,
        external_data=True if args.external_data else None,
    )
    adapter_files = []
    if layout == "inputs":
        for name, _ in adapters:
            path = out.with_name(f"{out.stem}.{name}.onnx_adapter")
            _write_adapter(gm, path, name, out)
            adapter_files.append(path)
    check = None
    if not args.no_check:
        try:
            check = _check(gm, ids, result, adapters, adapter_files)
        except Exception as e:  # the file is written; a runtime without the kernels says so
            check = (float("nan"), f"not run: {type(e).__name__}: {str(e).splitlines()[0][:120]}")

    _print_summary(result, source, adapters, adapter_files, check, time.perf_counter() - start)
    return 0


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
