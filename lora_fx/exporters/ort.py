"""ONNX Runtime: adapter files for the "inputs" layout, sessions with provider fallback, IOBinding.

    graph adapter or PEFT folder --write_ort_adapter--> a.onnx_adapter   (onnxruntime.AdapterFormat)

    session = ort_session("model.onnx")                  # CUDA (TensorRT if asked), else CPU
    session.run(None, feed, ort_run_options("a.onnx_adapter"))   # one session, any adapter per run
    session.run(None, feed)                              # no adapter: the base model
    bind_adapter(binding, "a.onnx_adapter")              # IOBinding: run_with_iobinding ignores
    session.run_with_iobinding(binding)                  #   active adapters, so bind the tensors

Rules:
1. Tensors are named as the "inputs" layout names them (`<site>.lora_A.weight`, see `_names.py`)
   and B (and a `lora_B` bias) holds `scale * B`: one graph serves adapters of any scale and rank.
2. A file may cover a subset of the model's sites; the others keep their zero-rank default.
3. Tensor dtypes must equal the model's: with `model=` the tensors are cast to the model's input
   dtypes and every name and non-rank dimension is checked against it before anything is written,
   as is each site's rank (A's axis 0 = B's axis 1). `check_ort_adapter` checks a file already
   written: ONNX Runtime and onnxruntime-genai load any file and fail only at run time.
4. Only A/B tensors fit an adapter file. A PEFT folder that also carries biases or
   `modules_to_save` weights is refused (they are not graph inputs), as is DoRA.
5. GPU: install `onnxruntime-gpu` instead of `onnxruntime` (the two packages conflict). Providers
   are tried in order TensorRT (only if asked), CUDA, CPU; those this build lacks are left out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.files import atomic_write, read_adapter_folder
from lora_fx.core.keys import FILE_PREFIX
from lora_fx.core.state import require_state
from lora_fx.errors import AdapterError
from lora_fx.exporters._names import input_names
from lora_fx.sites.kinds import lora_paths

__all__ = [
    "ADAPTER_SUFFIX",
    "adapter_ortvalues",
    "bind_adapter",
    "check_ort_adapter",
    "ort_adapter_tensors",
    "ort_providers",
    "ort_run_options",
    "ort_session",
    "write_ort_adapter",
]

log = logging.getLogger(__name__)

ADAPTER_SUFFIX = ".onnx_adapter"
_B_SUFFIXES = (".lora_B.weight", ".lora_B.bias", ".lora_embedding_B")
_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_TORCH_TO_ONNX = {
    torch.float32: 1,  # TensorProto.FLOAT
    torch.float16: 10,  # FLOAT16
    torch.bfloat16: 16,  # BFLOAT16
    torch.float64: 11,  # DOUBLE
}


def ort_adapter_tensors(
    source: torch.fx.GraphModule | str | os.PathLike, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The tensors of an ONNX Runtime adapter, by input name, scale folded into B (rule 1).

    Args:
        source: A graph holding the adapter, or a PEFT adapter folder.
        adapter_name: The adapter to take from a graph (ignored for a folder).

    Returns:
        `{"<site>.lora_A.weight": A, "<site>.lora_B.weight": scale * B, ...}`.

    Raises:
        AdapterError: No such adapter, or a folder with tensors an adapter file cannot hold.
    """
    if isinstance(source, torch.fx.GraphModule):
        return _from_graph(source, adapter_name)
    return _from_peft_folder(Path(source))


def write_ort_adapter(
    source: torch.fx.GraphModule | str | os.PathLike,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    model: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    adapter_version: int = 1,
    model_version: int = 1,
) -> dict[str, tuple[int, ...]]:
    """Write an ONNX Runtime adapter file (`onnxruntime.AdapterFormat`) for an "inputs" export.

    Args:
        source: A graph holding the adapter, or a PEFT adapter folder.
        path: The file to write (`.onnx_adapter` by convention); written atomically.
        adapter_name: The adapter to take from a graph.
        model: The exported `.onnx`: names and shapes are checked and dtypes taken from it.
        dtype: Tensor dtype when no `model` is given (default: the source's).
        adapter_version: Stored in the file.
        model_version: Stored in the file.

    Returns:
        Tensor name -> shape, as written.

    Raises:
        AdapterError: The adapter does not fit `model` (unknown names, wrong shapes), or `source`
            is unsuitable (rule 4).

    Example:
        >>> write_ort_adapter("peft_adapter/", "a.onnx_adapter", model="model.onnx")
        >>> session.run(None, feed, ort_run_options("a.onnx_adapter"))
    """
    tensors = ort_adapter_tensors(source, adapter_name)
    if model is not None:
        tensors = _fit_to_model(tensors, Path(model))
    elif dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    arrays = {name: _as_numpy(t) for name, t in tensors.items()}
    values = {
        name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _TORCH_TO_ONNX[t.dtype])
        for (name, array), t in zip(arrays.items(), tensors.values(), strict=True)
    }
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(adapter_version)
    adapter.set_model_version(model_version)
    adapter.set_parameters(values)
    target = Path(path)
    atomic_write(target, lambda tmp: adapter.export_adapter(str(tmp)))
    log.info("write_ort_adapter: %d tensors -> %s", len(values), target)
    return {name: tuple(t.shape) for name, t in tensors.items()}


def ort_run_options(*adapters: str | os.PathLike | ort.LoraAdapter) -> ort.RunOptions:
    """`onnxruntime.RunOptions` with these adapters active (paths or loaded `LoraAdapter`s).

    The options keep the adapters alive: `add_active_adapter` holds only a pointer, and an adapter
    garbage-collected before the run is silently not applied.

    Example:
        >>> outputs = session.run(None, feed, ort_run_options("a.onnx_adapter"))
    """
    options = _RunOptions()
    for adapter in adapters:
        if isinstance(adapter, (str, os.PathLike)):
            loaded = ort.LoraAdapter()
            loaded.Load(str(adapter))
            adapter = loaded
        options.add_active_adapter(adapter)
        options.adapters.append(adapter)
    return options


class _RunOptions(ort.RunOptions):
    """RunOptions that hold references to their active adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters: list[ort.LoraAdapter] = []


def adapter_ortvalues(
    path: str | os.PathLike, device: str = "cpu", device_id: int = 0
) -> dict[str, object]:
    """An adapter file's tensors as `OrtValue`s on `device` ("cpu" or "cuda"), for IOBinding."""
    values = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    if device == "cpu":
        return dict(values)
    return {
        name: ort.OrtValue.ortvalue_from_numpy(value.numpy(), device, device_id)
        for name, value in values.items()
    }


def bind_adapter(
    binding: object, adapter: str | os.PathLike | dict[str, object], device: str = "cpu"
) -> int:
    """Bind an adapter's tensors as inputs of an IOBinding; returns how many were bound.

    `run_with_iobinding` ignores `RunOptions` adapters, but the LoRA tensors are plain graph inputs,
    so binding them gives the same result. Pass a dict from `adapter_ortvalues` to bind device
    tensors read once.

    Example:
        >>> binding = session.io_binding(); binding.bind_cpu_input("input_ids", ids)
        >>> bind_adapter(binding, "a.onnx_adapter"); binding.bind_output("logits")
        >>> session.run_with_iobinding(binding)
    """
    values = adapter if isinstance(adapter, dict) else adapter_ortvalues(adapter, device)
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    return len(values)


def ort_providers(device: str = "auto", *, tensorrt: bool = False) -> list[str]:
    """Execution providers to ask for, best first, limited to those this onnxruntime build has.

    Args:
        device: `"auto"` (GPU if the build has it, else CPU), `"cuda"` or `"cpu"`.
        tensorrt: Put TensorRT first (when the build has it).

    Returns:
        E.g. `["CUDAExecutionProvider", "CPUExecutionProvider"]`; CPU is always last.

    Raises:
        ValueError: An unknown device.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={device!r} is invalid; expected 'auto', 'cuda' or 'cpu'")
    wanted = []
    if device != "cpu":
        if tensorrt:
            wanted.append("TensorrtExecutionProvider")
        wanted.append("CUDAExecutionProvider")
    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    if device == "cuda" and not chosen:
        log.warning(
            "ort_providers: this onnxruntime has no CUDA provider (%s); using CPU. "
            "Install onnxruntime-gpu instead of onnxruntime for GPUs",
            sorted(available),
        )
    return [*chosen, "CPUExecutionProvider"]


def ort_session(
    path: str | os.PathLike,
    *,
    device: str = "auto",
    tensorrt: bool = False,
    options: object | None = None,
) -> object:
    """An `onnxruntime.InferenceSession` on the best available provider (`ort_providers`).

    Example:
        >>> session = ort_session("model.onnx")
        >>> session.get_providers()   # ['CUDAExecutionProvider', 'CPUExecutionProvider'] on a GPU
    """
    if options is None:
        options = ort.SessionOptions()
        # LoRA inputs with defaults trigger one "initializer appears in graph inputs" warning each.
        options.log_severity_level = 3
    providers = ort_providers(device, tensorrt=tensorrt)
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def _from_graph(gm: torch.fx.GraphModule, adapter_name: str) -> dict[str, torch.Tensor]:
    """A graph adapter's A and scale * B under the "inputs" names."""
    state = require_state(gm)
    if adapter_name not in state.adapters:
        raise AdapterError(
            f"unknown adapter {adapter_name!r}; adapters on this graph: {list(state.adapters)}"
        )
    record = state.adapters[adapter_name]
    if record.modules_to_save:
        raise AdapterError(
            f"adapter {adapter_name!r} has modules_to_save copies {record.modules_to_save}, "
            "which an ONNX Runtime adapter cannot carry; export it merged instead"
        )
    tensors = {}
    for fqn, rec in record.sites.items():
        paths, names = lora_paths(rec.kind, fqn, adapter_name), input_names(rec.kind, fqn)
        b = _graph.get_attr(gm, paths.b).detach()
        tensors[names.a] = _graph.get_attr(gm, paths.a).detach().cpu()
        tensors[names.b] = (b.float() * rec.scale).to(b.dtype).cpu()
        if rec.lora_bias:
            bias = _graph.get_attr(gm, paths.b_bias).detach()
            tensors[names.b_bias] = (bias.float() * rec.scale).to(bias.dtype).cpu()
    return tensors


def _from_peft_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A PEFT folder's A and scale * B under the "inputs" names (the file keys without prefix)."""
    cfg, file_tensors = read_adapter_folder(folder)
    variants = {"DoRA": cfg.use_dora, "KaSA": cfg.kasa_config, "BD-LoRA": cfg.use_bdlora}
    variant = next((name for name, used in variants.items() if used), None)
    if variant is not None:
        raise AdapterError(
            f"adapter in {str(folder)!r} uses {variant}; ONNX Runtime adapters are LoRA"
        )
    tensors, other = {}, []
    for key, tensor in file_tensors.items():
        name = key[len(FILE_PREFIX) :] if key.startswith(FILE_PREFIX) else None
        suffix = next((s for s in (*_A_SUFFIXES, *_B_SUFFIXES) if key.endswith(s)), None)
        if name is None or suffix is None:
            other.append(key)
            continue
        site = name[: -len(suffix)]
        if suffix in _B_SUFFIXES:
            tensor = (tensor.float() * cfg.scale_for(site)).to(tensor.dtype)
        tensors[name] = tensor
    if other:
        raise AdapterError(
            f"adapter in {str(folder)!r} has {len(other)} tensors that are not LoRA A/B "
            f"(e.g. {sorted(other)[:3]}: biases or modules_to_save); an ONNX Runtime adapter "
            "cannot carry them; export that adapter merged instead"
        )
    if not tensors:
        raise AdapterError(f"adapter in {str(folder)!r} has no LoRA tensors")
    return tensors


def _fit_to_model(tensors: dict[str, torch.Tensor], model: Path) -> dict[str, torch.Tensor]:
    """Check names and non-rank dims against the model's inputs; cast to their dtypes (rule 3)."""
    proto = onnx.load(str(model), load_external_data=False)
    inputs = {}
    for value in proto.graph.input:
        tensor_type = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        inputs[value.name] = (onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), dims)
    lora_inputs = sorted(n for n in inputs if n.endswith((*_A_SUFFIXES, *_B_SUFFIXES)))
    unknown = sorted(set(tensors) - set(inputs))
    wrong = []
    for name, tensor in tensors.items():
        if name in inputs:
            dims = inputs[name][1]
            fixed = [(i, d) for i, d in enumerate(dims) if isinstance(d, int)]
            if len(dims) != tensor.dim() or any(tensor.shape[i] != d for i, d in fixed):
                wrong.append(f"{name}: adapter {tuple(tensor.shape)} vs model {dims}")
    wrong.extend(_rank_mismatches(tensors))
    if unknown or wrong:
        problems = []
        if unknown:
            problems.append(
                f"{len(unknown)} tensors are not inputs of the model, e.g. {unknown[:3]} "
                f"(its LoRA inputs: {lora_inputs[:3]}{'...' if len(lora_inputs) > 3 else ''}; "
                "was it exported with merged=False, lora_layout='inputs'?)"
            )
        if wrong:
            problems.append(f"{len(wrong)} mis-shaped tensors, e.g. {wrong[:3]}")
        raise AdapterError(f"adapter does not fit {str(model)!r}: " + "; ".join(problems))
    dtypes = {name: _numpy_to_torch(inputs[name][0]) for name in tensors}
    return {name: tensor.to(dtypes[name]) for name, tensor in tensors.items()}


def _rank_mismatches(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Sites whose A rank (axis 0) differs from their B rank (axis 1): `[r, in]`, `[out, r, ...]`.

    ONNX Runtime only notices at run time, as "MatMul dimension mismatch" without the tensor name.
    """
    wrong = []
    for a_suffix, b_suffix in zip(_A_SUFFIXES, _B_SUFFIXES[::2], strict=True):
        for name, a in tensors.items():
            b = tensors.get(name[: -len(a_suffix)] + b_suffix) if name.endswith(a_suffix) else None
            if b is not None and (a.dim() < 1 or b.dim() < 2 or a.shape[0] != b.shape[1]):
                wrong.append(
                    f"{name[: -len(a_suffix)]}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                    "have different ranks"
                )
    return wrong


def check_ort_adapter(path: str | os.PathLike, model: str | os.PathLike) -> dict[str, tuple]:
    """Check an `.onnx_adapter` file against an "inputs" export before serving it.

    ONNX Runtime (and onnxruntime-genai) load any adapter file and fail only when a request runs
    it, some cases with a message that names no tensor (a rank that differs between A and B).

    Args:
        path: The adapter file.
        model: The `.onnx` it is meant for.

    Returns:
        Tensor name -> shape.

    Raises:
        AdapterError: Names the model does not take, shapes or dtypes that do not fit, or A/B
            pairs of different ranks; the message lists them.

    Example:
        >>> check_ort_adapter("a.onnx_adapter", "genai_out/model.onnx")
    """
    try:
        values = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:
        raise AdapterError(f"{str(path)!r} is not an ONNX Runtime adapter file: {e}") from e
    tensors = {name: _tensor_of(value) for name, value in values.items()}
    fitted = _fit_to_model(tensors, Path(model))
    cast = sorted(n for n in tensors if fitted[n].dtype != tensors[n].dtype)
    if cast:
        raise AdapterError(
            f"adapter {str(path)!r} does not fit {str(model)!r}: tensors {cast[:3]} are "
            f"{tensors[cast[0]].dtype}, the model takes {fitted[cast[0]].dtype}; write the "
            "adapter again with write_ort_adapter(..., model=...)"
        )
    return {name: tuple(t.shape) for name, t in tensors.items()}


def _tensor_of(value: object) -> torch.Tensor:
    """A torch tensor of an adapter file's `OrtValue` (bfloat16 from its uint16 bits)."""
    array = value.numpy()
    if value.data_type() == "tensor(bfloat16)":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _numpy_to_torch(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of an ONNX input's numpy dtype (bfloat16 via ml_dtypes' name)."""
    if str(dtype) == "bfloat16":
        return torch.bfloat16
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU array; bfloat16 as its uint16 bits (the ONNX type is passed alongside)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()
