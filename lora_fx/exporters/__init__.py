"""Exporters: ONNX files and ONNX Runtime adapter files, sessions and IOBinding helpers.

    export_onnx(gm, args, path)                     merged: plain graph, fastest
    export_onnx(..., merged=False)                  LoRA initializers with PEFT-derived names
    export_onnx(..., merged=False, lora_layout="inputs") + write_ort_adapter(...) per adapter:
                                                    one ONNX Runtime session, adapter chosen per run
    export_onnx(..., merged=False, lora_layout="stacked"):
                                                    input adapter_index[batch]: adapter per row
    export_onnx(gm, None, path, with_past=True)     generation graph: past/present KV tensors
    export_genai(gm, out_dir)                       a folder onnxruntime-genai loads

Needs the `onnx` extra (`onnx`, `onnxruntime` or `onnxruntime-gpu`, `onnxscript`).
"""

from lora_fx.errors import OnnxExportError
from lora_fx.exporters.genai import GENAI_MODEL_TYPES, GenaiExport, export_genai, genai_config
from lora_fx.exporters.onnx import BASE_INDEX, OnnxExport, export_onnx
from lora_fx.exporters.ort import (
    ADAPTER_SUFFIX,
    adapter_ortvalues,
    bind_adapter,
    check_ort_adapter,
    ort_adapter_tensors,
    ort_providers,
    ort_run_options,
    ort_session,
    write_ort_adapter,
)

__all__ = [
    "ADAPTER_SUFFIX",
    "BASE_INDEX",
    "GENAI_MODEL_TYPES",
    "GenaiExport",
    "OnnxExport",
    "OnnxExportError",
    "adapter_ortvalues",
    "bind_adapter",
    "check_ort_adapter",
    "export_genai",
    "export_onnx",
    "genai_config",
    "ort_adapter_tensors",
    "ort_providers",
    "ort_run_options",
    "ort_session",
    "write_ort_adapter",
]
