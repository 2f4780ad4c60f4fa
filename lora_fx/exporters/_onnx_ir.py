"""Edits of the exported ONNX model (onnx_ir), and writing it atomically.

    merged weights   initializer W  ->  LazyTensor(W + sum scale * B @ A), computed while writing
    optimize         onnxscript's optimizer (torch's default), LoRA tensors protected from renaming
    inputs layout    initializer A[r, in]  ->  graph input A["<site>.r", in], default A[0, in]

Rules:
1. The optimizer folds `Transpose(A)` into a new initializer `val_N`, losing the PEFT-derived name;
   LoRA tensors are made graph inputs while it runs, which it never folds, then put back.
2. ONNX Runtime adapters can only override graph inputs, so in the "inputs" layout each LoRA tensor
   is an input with an initializer of the same name as its default: a zero-rank tensor, which makes
   the branch add zeros (the base model). Its rank dimension is symbolic, one name per site.
3. Shapes recorded for values downstream of a LoRA input were inferred at the traced rank; they are
   dropped (ONNX Runtime infers them again at load) so another rank cannot clash with them.
4. A model is written into a temporary folder beside the target, then renamed into place, data
   file first: a failure leaves no half-written `.onnx`. Models whose tensors exceed
   `EXTERNAL_DATA_BYTES` (protobuf's limit is 2 GiB) put them in `<name>.data` beside the `.onnx`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx_ir as ir
import torch

from lora_fx.core.files import clean_stale, make_temp_folder
from lora_fx.core.quiet import dropping_records
from lora_fx.errors import OnnxExportError

__all__ = [
    "EXTERNAL_DATA_BYTES",
    "install_onnx",
    "lift_to_inputs",
    "optimize_keeping",
    "save_atomic",
    "swap_merged_weights",
    "tensor_bytes",
]

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GiB, leaving room for the graph itself
_DEDUP_LOGGER = "onnx_ir.passes.common.initializer_deduplication"
_SKIPPED_DEDUP = "Skipped deduplication of initializer '%s' as it is a graph input"


def swap_merged_weights(model: ir.Model, merged: dict[str, Callable[[], torch.Tensor]]) -> None:
    """Replace merged site weights by lazy tensors: no copy is held before the file is written."""
    for name, compute in merged.items():
        value = model.graph.initializers[name]
        old = value.const_value
        value.const_value = ir.LazyTensor(
            lambda compute=compute: ir.tensor(compute()),
            dtype=old.dtype,
            shape=old.shape,
            name=name,
        )


def optimize_keeping(optimize: Callable[[], None], model: ir.Model, names: Iterable[str]) -> None:
    """Run `optimize()` on `model` with the named initializers protected from folding (rule 1)."""
    protected = [model.graph.initializers[name] for name in names]
    already = set(model.graph.inputs)
    added = [value for value in protected if value not in already]
    model.graph.inputs.extend(added)
    added_names = {(value.name,) for value in added}

    def skipped_added(record: logging.LogRecord) -> bool:  # one warning per protected tensor
        args = record.args if isinstance(record.args, tuple) else ()
        return str(record.msg).startswith(_SKIPPED_DEDUP) and args[:1] in added_names

    try:
        with dropping_records(_DEDUP_LOGGER, skipped_added):
            optimize()
    finally:
        for value in added:
            model.graph.inputs.remove(value)


def lift_to_inputs(
    model: ir.Model, rank_axes: dict[str, tuple[int, str]], dtypes: dict[str, torch.dtype]
) -> None:
    """Make each LoRA tensor a graph input with a zero-rank default and a symbolic rank (rule 2)."""
    lifted = []
    for name, (axis, dim) in rank_axes.items():
        value = model.graph.initializers[name]
        shape = list(value.const_value.shape)
        zero = [0 if i == axis else size for i, size in enumerate(shape)]
        value.const_value = ir.tensor(torch.zeros(zero, dtype=dtypes[name]), name=name)
        shape[axis] = dim
        value.shape = ir.Shape(shape)
        model.graph.inputs.append(value)
        lifted.append(value)
    _drop_stale_shapes(model, lifted)


def _drop_stale_shapes(model: ir.Model, sources: list[ir.Value]) -> int:
    """Forget the shapes of values computed from `sources` (rule 3); returns how many."""
    outputs = set(model.graph.outputs)
    seen: set[ir.Value] = set()
    todo = list(sources)
    while todo:
        value = todo.pop()
        for node in value.consumers():
            for out in node.outputs:
                if out not in seen:
                    seen.add(out)
                    todo.append(out)
    dropped = 0
    for value in seen:
        if value not in outputs and value.shape is not None:
            value.shape = None
            dropped += 1
    return dropped


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of every initializer (from shapes and dtypes; lazy tensors are not computed)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.dtype.itemsize * math.prod(tensor.shape))
    return total


def save_atomic(model: ir.Model, target: Path, external_data: bool) -> Path | None:
    """Write `model` to `target` (and a fresh `<target>.<token>.data`) via a temp folder (rule 4).

    Returns:
        The data file's path, or None when the tensors are inside the `.onnx`.
    """
    stage = make_temp_folder(target)
    try:
        data_name = f"{target.name}.{secrets.token_hex(4)}.data" if external_data else None
        ir.save(model, stage / target.name, external_data=data_name)
        return install_onnx(stage / target.name, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def install_onnx(staged: Path, target: Path) -> Path | None:
    """Move a written `.onnx` and its data file to `target`, then drop the replaced data (rule 4).

    Returns:
        The installed data file's path, or None when the `.onnx` has no data file.
    """
    data = [p for p in staged.parent.iterdir() if _data_names(target.name).fullmatch(p.name)]
    # The .onnx names its one data file after itself.
    if staged.name != target.name or len(data) > 1:
        raise OnnxExportError(
            f"cannot install {str(staged)!r} as {str(target)!r}: expected one .onnx named like the "
            f"target and at most one data file, found {sorted(p.name for p in data)}"
        )
    for file in data:  # a new name: the old .onnx still reads its own data
        os.replace(file, target.parent / file.name)
    os.replace(staged, target)  # the one step from the old model to the new one
    kept = target.parent / data[0].name if data else None
    for file in target.parent.iterdir():  # data of the replaced model, or of killed writes
        if _data_names(target.name).fullmatch(file.name) and file != kept:
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
    clean_stale(target)
    return kept


def _data_names(name: str) -> re.Pattern:
    """Data files lora_fx names for the `.onnx` file `name`: `<name>[.<8 hex>].data`."""
    return re.compile(rf"{re.escape(name)}(\.[0-9a-f]{{8}})?\.data")
