"""ONNX export: onnxruntime parity (merged, unmerged, dynamic shapes), structure, ONNX Runtime
multi-LoRA sessions and adapter files, stacked per-row adapters, the CLI, and bad input."""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import SeenMessages, kill_loop, lora_roles
from models import SITE_CASES, TinyBlockStack, TinyConv, TinyMLP, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from torch.export import Dim

import lora_fx
from lora_fx import AdapterError, LoraConfig, UnsupportedSiteError
from lora_fx.cli import main
from lora_fx.exporters import (
    BASE_INDEX,
    OnnxExportError,
    _onnx_ir,
    bind_adapter,
    export_onnx,
    ort_adapter_tensors,
    ort_providers,
    ort_run_options,
    ort_session,
    write_ort_adapter,
)
from lora_fx.exporters import onnx as onnx_exporter
from lora_fx.exporters._names import input_names
from lora_fx.sites.kinds import lora_paths

HF_KW = {"use_cache": False}


@pytest.fixture(autouse=True, scope="module")
def _one_registry(one_onnx_registry):
    yield


def _inject(gm, targets, name="default", r=4, alpha=8):
    """An adapter with random (nonzero) B, so adapted outputs differ from the base."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    return lora_fx.inject(gm, cfg, name).eval()


def _torch(gm, *args):
    with torch.no_grad():
        out = gm(*args)
    return out.logits if hasattr(out, "logits") else out


def _ort(path, feed, options=None):
    return torch.from_numpy(ort_session(path, device="cpu").run(None, feed, options)[0])


def _file_ops(path) -> Counter:
    return Counter(
        node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node
    )


def _initializers(path) -> set[str]:
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def _snapshot(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}, lora_roles(gm)


def _assert_untouched(gm, snapshot):
    tensors, roles = snapshot
    now = gm.state_dict()
    assert set(now) == set(tensors)
    assert all(torch.equal(now[k], v) for k, v in tensors.items()), "export changed a weight"
    assert lora_roles(gm) == roles, "export changed the graph"


# ---- merged ------------------------------------------------------------------------------------

CUSTOM = {
    "blocks": (
        TinyBlockStack,
        lambda: torch.randint(0, 50, (3, 5)),
        ["attn", "mlp", "embed", "head"],
    ),
    "conv": SITE_CASES["conv"],
}


@pytest.mark.parametrize(("name", "method"), [("blocks", "export"), ("conv", "fx")])
def test_merged_matches_torch_with_the_base_export_ops(name, method, tmp_path):
    model_cls, make_input, targets = CUSTOM[name]
    x = make_input()
    gm = lora_fx.capture(model_cls().eval(), (x,), method=method)
    base_out = _torch(gm, x)
    base = export_onnx(gm, (x,), tmp_path / "base.onnx")
    _inject(gm, targets)
    assert_differs(_torch(gm, x), base_out)
    snapshot = _snapshot(gm)

    merged = export_onnx(gm, (x,), tmp_path / "merged.onnx")

    assert merged.layout == "merged" and merged.lora_tensors == {}
    assert not [n for n in _initializers(merged.path) if ".lora_" in n]
    assert merged.op_counts == base.op_counts == dict(_file_ops(merged.path))
    assert_close(_ort(merged.path, {merged.inputs[0]: x.numpy()}), _torch(gm, x))
    _assert_untouched(gm, snapshot)


def test_llama_merged_matches_torch_with_the_base_export_ops(tmp_path):
    ids = torch.randint(0, 256, (2, 8))
    gm = lora_fx.capture(tiny_llama().eval(), (ids,), HF_KW)
    base = export_onnx(gm, (ids,), tmp_path / "base.onnx")
    _inject(gm, "all-linear")
    merged = export_onnx(gm, (ids,), tmp_path / "merged.onnx")
    assert merged.op_counts == base.op_counts
    assert merged.outputs == ("logits",)
    assert_close(_ort(merged.path, {"input_ids": ids.numpy()}), _torch(gm, ids))


def test_dynamic_shapes_are_inherited_from_the_capture(tmp_path):
    ids = torch.randint(0, 50, (3, 5))
    shapes = ({0: Dim("batch"), 1: Dim("seq", max=64)},)
    gm = lora_fx.capture(TinyBlockStack().eval(), (ids,), dynamic_shapes=shapes)
    _inject(gm, ["attn", "mlp", "embed"], "a", r=4)
    _inject(gm, ["attn", "head"], "b", r=2)
    lora_fx.set_adapter(gm, ["a", "b"])  # merged export folds the active adapters
    merged = export_onnx(gm, (ids,), tmp_path / "merged.onnx")
    stacked = export_onnx(
        gm, (ids,), tmp_path / "stacked.onnx", merged=False, lora_layout="stacked"
    )

    graph = onnx.load(str(merged.path), load_external_data=False).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "ids_dim1"]  # rule 2 of _shapes.py
    for shape in [(3, 5), (1, 9), (6, 2)]:
        other = torch.randint(0, 50, shape)
        assert_close(_ort(merged.path, {"ids": other.numpy()}), _torch(gm, other))
        _assert_rows(gm, stacked, other)


def test_gpt2_merged_unties_the_lm_head_from_the_embedding(tmp_path):
    ids = torch.randint(0, 256, (2, 8))
    gm = lora_fx.capture(tiny_gpt2().eval(), (ids,), HF_KW)
    _inject(gm, ["c_attn", "lm_head"])
    merged = export_onnx(gm, (ids,), tmp_path / "gpt2.onnx")
    # The embedding keeps the base weight under its own name; lm_head reads a merged copy.
    model = onnx.load(str(merged.path))
    wte = next(t for t in model.graph.initializer if t.name == "transformer.wte.weight")
    base = gm.get_parameter("transformer.wte.weight").detach().numpy()
    assert np.array_equal(onnx.numpy_helper.to_array(wte), base)
    assert_close(_ort(merged.path, {"input_ids": ids.numpy()}), _torch(gm, ids))


def test_float16_model_exports_in_float16(tmp_path):
    ids = torch.randint(0, 50, (3, 5))
    gm = lora_fx.capture(TinyBlockStack().half().eval(), (ids,))
    _inject(
        gm, ["attn", "mlp", "embed"]
    )  # float32 adapter on float16 sites (autocast_adapter_dtype)
    expected = _torch(gm, ids)
    merged = export_onnx(gm, (ids,), tmp_path / "merged.onnx")
    multi = export_onnx(gm, (ids,), tmp_path / "multi.onnx", merged=False, lora_layout="inputs")
    written = write_ort_adapter(gm, tmp_path / "a.onnx_adapter", model=multi.path)
    assert written
    outputs = [
        _ort(merged.path, {"ids": ids.numpy()}),
        _ort(multi.path, {"ids": ids.numpy()}, ort_run_options(tmp_path / "a.onnx_adapter")),
    ]
    for got in outputs:
        assert got.dtype == torch.float16
        # float16 end to end: onnxruntime and torch round each op differently (~1e-3 relative).
        assert_close(got.float(), expected.float(), dtype=torch.bfloat16)


# ---- unmerged: named initializers --------------------------------------------------------------


def test_unmerged_keeps_branches_with_peft_named_initializers(tmp_path):
    ids = torch.randint(0, 50, (3, 5))
    gm = lora_fx.capture(TinyBlockStack().eval(), (ids,))
    _inject(gm, ["attn", "embed"], "a", r=4)
    _inject(gm, ["attn", "head"], "b", r=2)
    lora_fx.set_adapter(gm, ["a", "b"])

    out = export_onnx(gm, (ids,), tmp_path / "unmerged.onnx", merged=False)  # optimizer on

    state = gm.meta["lora_fx"]
    expected = {}
    for name in ("a", "b"):
        for site, rec in state.adapters[name].sites.items():
            paths = lora_paths(rec.kind, site, name)
            expected |= {paths.a: paths.a_key, paths.b: paths.b_key}
    assert out.lora_tensors == expected
    assert set(expected) <= _initializers(out.path)
    assert (
        expected["layers.0.attn.lora_A.a.weight"] == "base_model.model.layers.0.attn.lora_A.weight"
    )
    graph = onnx.load(str(out.path), load_external_data=False).graph
    read = {name for node in graph.node for name in node.input}
    assert set(expected) <= read  # the branches are in the graph and read every A and B
    assert_close(_ort(out.path, {"ids": ids.numpy()}), _torch(gm, ids))


def test_bert_unmerged_with_dynamic_shapes_matches_torch(tmp_path):
    ids = torch.randint(0, 256, (2, 7))
    shapes = {"input_ids": {0: Dim("batch"), 1: Dim("seq", max=64)}}
    gm = lora_fx.capture(tiny_bert().eval(), (ids,), dynamic_shapes=shapes)
    _inject(gm, ["query", "value"])
    out = export_onnx(gm, (ids,), tmp_path / "bert.onnx", merged=False)
    assert out.outputs == ("logits",)
    assert "bert.encoder.layer.0.attention.self.query.lora_A.default.weight" in out.lora_tensors
    for shape in [(2, 7), (5, 3)]:
        other = torch.randint(0, 256, shape)
        assert_close(_ort(out.path, {"input_ids": other.numpy()}), _torch(gm, other))


# ---- unmerged: ONNX Runtime multi-LoRA ---------------------------------------------------------


@pytest.fixture
def peft_llama_adapter(tmp_path):
    """A PEFT adapter folder (r=8) for tiny_llama, on other sites than the lora_fx one."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    cfg = PeftConfig(
        r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path / "peft_b")
    return tmp_path / "peft_b"


def test_one_ort_session_serves_two_adapters_of_different_ranks(tmp_path, peft_llama_adapter):
    ids = torch.randint(0, 256, (2, 8))
    gm = lora_fx.capture(tiny_llama().eval(), (ids,), HF_KW)
    _inject(gm, ["q_proj", "v_proj"], "a", r=4)
    lora_fx.load_adapter(gm, peft_llama_adapter, "b")
    gm.eval()
    expected = {}
    for name in ("a", "b"):
        lora_fx.set_adapter(gm, name)
        expected[name] = _torch(gm, ids)
    with lora_fx.disable_adapters(gm):
        expected[None] = _torch(gm, ids)
    assert_differs(expected["a"], expected["b"])

    model = export_onnx(gm, (ids,), tmp_path / "multi.onnx", merged=False, lora_layout="inputs")
    write_ort_adapter(gm, tmp_path / "a.onnx_adapter", "a", model=model.path)
    written = write_ort_adapter(peft_llama_adapter, tmp_path / "b.onnx_adapter", model=model.path)

    q_a = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert written[q_a] == (8, 64)  # straight from the PEFT folder
    graph = onnx.load(str(model.path), load_external_data=False).graph
    inputs = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in graph.input
    }
    assert inputs[q_a] == ["model.layers.0.self_attn.q_proj.r", 64]
    assert model.inputs == ("input_ids",)  # LoRA inputs have defaults; callers feed ids only
    from_folder = ort_adapter_tensors(peft_llama_adapter)
    from_graph = ort_adapter_tensors(gm, "b")
    assert from_folder.keys() == from_graph.keys()
    for key, tensor in from_folder.items():
        assert_close(tensor, from_graph[key])

    session = ort_session(model.path, device="cpu")
    feed = {"input_ids": ids.numpy()}
    for name in ("a", "b", None, "a"):  # switch back and forth, no reload
        options = ort_run_options(tmp_path / f"{name}.onnx_adapter") if name else None
        assert_close(torch.from_numpy(session.run(None, feed, options)[0]), expected[name])
    # IOBinding ignores active adapters: bind the tensors as inputs instead.
    binding = session.io_binding()
    binding.bind_cpu_input("input_ids", ids.numpy())
    assert bind_adapter(binding, tmp_path / "b.onnx_adapter") == len(written)
    binding.bind_output("logits")
    session.run_with_iobinding(binding)
    assert_close(torch.from_numpy(binding.copy_outputs_to_cpu()[0]), expected["b"])
    # Zero-rank tensors (what onnxruntime-genai feeds for inactive adapters) give the base model.
    zeros = {}
    for value in session.get_inputs()[1:]:
        shape = [0 if isinstance(d, str) else d for d in value.shape]
        zeros[value.name] = np.zeros(shape, dtype=np.float32)
    assert_close(torch.from_numpy(session.run(None, feed | zeros)[0]), expected[None])


# ---- unmerged: stacked adapters, one per batch row ---------------------------------------------


def _assert_rows(gm, export, batch):
    """Each row of one stacked run equals the torch graph run with that row's adapter alone."""
    rows = (["a", "b", None, "b", "a", None] * 2)[: batch.shape[0]]
    index = export.adapter_index(rows)
    if len(index) > 2:
        index[2] = len(export.adapters)  # slot n is the base model too, as is -1
    got = _ort(export.path, {export.inputs[0]: batch.numpy(), "adapter_index": index})
    expected = {}
    for name in ("a", "b"):
        lora_fx.set_adapter(gm, name)
        expected[name] = _torch(gm, batch)
    with lora_fx.disable_adapters(gm):
        expected[None] = _torch(gm, batch)
    lora_fx.set_adapter(gm, ["a", "b"])
    for row, name in enumerate(rows):
        assert_close(got[row], expected[name][row])


@pytest.mark.parametrize("name", ["conv", "gpt2"])
def test_stacked_rows_each_match_their_adapter(name, tmp_path):
    if name == "conv":
        x = torch.randn(3, 3, 6, 6)
        gm = lora_fx.capture(TinyConv().eval(), (x,))
        targets = ["conv0", "conv1", "lin0"]
    else:  # Conv1D sites flatten the batch: addmm on [batch * seq, in]
        x = torch.randint(0, 256, (3, 6))
        # Static shapes: with a dynamic sequence, `stacked_linear`'s reshape of GPT-2's flattened
        # [batch * seq, in] rows to [batch, -1, in] makes export raise a constraint violation
        # (a guard `s * min(32, 32 * s) == 32 * s` it cannot prove).
        gm = lora_fx.capture(tiny_gpt2().eval(), (x,), HF_KW, dynamic_shapes=None)
        targets = ["c_attn", "c_fc", "wte"]
    _inject(gm, targets, "a", r=4)
    _inject(gm, targets[:2], "b", r=2, alpha=3)

    out = export_onnx(gm, (x,), tmp_path / "stacked.onnx", merged=False, lora_layout="stacked")

    assert out.adapters == ("a", "b") and out.inputs == (out.inputs[0], "adapter_index")
    assert out.adapter_index(["b", None]).tolist() == [1, BASE_INDEX]
    assert all(key.startswith("base_model.model.") for key in out.lora_tensors.values())
    assert all(
        ".lora_A.stacked" in n or ".lora_B.stacked" in n or "embedding" in n
        for n in out.lora_tensors
    )
    _assert_rows(gm, out, x)


# ---- external data, providers, names -----------------------------------------------------------


@pytest.fixture
def mlp(tmp_path):
    x = torch.randn(3, 10)
    gm = _inject(lora_fx.capture(TinyMLP().eval(), (x,)), ["lin0", "lin1"])
    return gm, x


def test_external_data_file_is_written_and_loads(mlp, tmp_path):
    gm, x = mlp
    out = export_onnx(gm, (x,), tmp_path / "mlp.onnx", external_data=True)
    assert re.fullmatch(r"mlp\.onnx\.[0-9a-f]{8}\.data", out.data_path.name)
    assert out.data_path.parent == tmp_path and out.data_path.stat().st_size > 0
    assert_close(_ort(out.path, {"x": x.numpy()}), _torch(gm, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", out.data_path.name]
    # A new export names its data afresh and removes the replaced model's.
    again = export_onnx(gm, (x,), tmp_path / "mlp.onnx", external_data=True)
    assert again.data_path != out.data_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", again.data_path.name]
    # An adapter for another model is refused before anything is written.
    with pytest.raises(AdapterError, match=r"not inputs of the model.*lora_layout='inputs'"):
        write_ort_adapter(gm, tmp_path / "x.onnx_adapter", model=out.path)
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_external_data_switches_on_above_the_threshold(mlp, tmp_path, monkeypatch):
    gm, x = mlp
    monkeypatch.setattr("lora_fx.exporters.onnx.EXTERNAL_DATA_BYTES", 100)
    out = export_onnx(gm, (x,), tmp_path / "big.onnx", merged=False)
    assert out.data_path is not None
    assert_close(_ort(out.path, {"x": x.numpy()}), _torch(gm, x))


def test_providers_prefer_gpus_and_fall_back_to_cpu(monkeypatch, caplog):
    # onnxruntime-gpu is not installed here (no GPU): this checks the ordering logic only.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert ort_providers() == ["CPUExecutionProvider"]
    assert ort_providers("cuda") == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    assert ort_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(tensorrt=True) == gpu
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="device='tpu' is invalid"):
        ort_providers("tpu")


def test_names_are_peft_keys_without_prefix():
    names = input_names("linear", "model.layers.0.q_proj")
    assert (names.a, names.b) == (
        "model.layers.0.q_proj.lora_A.weight",
        "model.layers.0.q_proj.lora_B.weight",
    )
    assert names.a_key == "base_model.model." + names.a
    emb = input_names("embedding", "embed")
    assert (emb.a, emb.b) == ("embed.lora_embedding_A", "embed.lora_embedding_B")


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_exports_the_embedded_default_with_adapters(tmp_path, peft_llama_adapter, capsys):
    out = tmp_path / "cli.onnx"
    code = main(
        [
            "export-onnx",
            "--out",
            str(out),
            "--adapter",
            f"b={peft_llama_adapter}",
            "--layout",
            "inputs",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert out.is_file() and (tmp_path / "cli.b.onnx_adapter").is_file()
    assert "embedded tiny Llama" in text and "ORT adapter" in text
    diff = float(text.split("max |diff| ")[1].split()[0])
    assert diff < 1e-4


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    args = ["export-onnx", "--out", str(tmp_path / "m.onnx"), "--model", str(tmp_path / "nope")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a transformers model folder" in err
    assert main([*args, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "export-onnx" in capsys.readouterr().out


def test_cli_refuses_what_onnxruntime_cannot_run_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", "--out", str(out), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "onnxruntime cannot run the exported model on CPU, so nothing was written" in err
    assert "use --dtype float16 or float32, or pass --no-check" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_creates_the_folder_and_refuses_an_existing_file_unless_forced(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "m.onnx"
    args = ["export-onnx", "--out", str(out), "--static", "--no-optimize"]
    assert main(args) == 0
    assert "check           onnxruntime vs torch" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["m.onnx"]  # no temporary folder left
    out.write_bytes(b"mine")
    assert main(args) == 2
    assert "m.onnx' exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert main([*args, "--force", "--no-check"]) == 0
    assert onnx.load(str(out)).graph.output[0].name == "logits"


def test_export_drops_only_its_own_notices_and_restores_the_loggers(mlp, tmp_path, monkeypatch):
    """A filter on the one message, for the call: other records of those loggers still pass."""
    gm, x = mlp
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    names = (registry.name, dedup.name, "onnx_ir")

    def loggers():
        return {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}

    before = loggers()
    real_translate, real_keep = onnx_exporter._translate, onnx_exporter.optimize_keeping

    def translate(*args):
        registry.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        registry.warning("another registry warning")
        return real_translate(*args)

    def keep(optimize, model, names):
        def optimize_and_warn():
            dedup.warning("Skipped deduplication of initializer '%s' as it is a graph input", "x")
            optimize()

        return real_keep(optimize_and_warn, model, names)

    monkeypatch.setattr(onnx_exporter, "_translate", translate)
    monkeypatch.setattr(onnx_exporter, "optimize_keeping", keep)
    seen = SeenMessages()
    registry.addHandler(seen)
    dedup.addHandler(seen)
    try:
        export_onnx(gm, (x,), tmp_path / "m.onnx", merged=False)
    finally:
        registry.removeHandler(seen)
        dedup.removeHandler(seen)
    assert "another registry warning" in seen.messages
    assert "Skipped deduplication of initializer 'x' as it is a graph input" in seen.messages
    assert not any("torchvision" in m or "lora_A" in m or "lora_B" in m for m in seen.messages)
    assert loggers() == before


# ---- bad input ---------------------------------------------------------------------------------


@torch.library.custom_op("lora_fx_test::wiggle", mutates_args=())
def _wiggle(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_wiggle.register_fake
def _(x):
    return torch.empty_like(x)


class _Wiggle(nn.Module):
    def forward(self, x):
        return torch.ops.lora_fx_test.wiggle(x)


class _WithCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = _Wiggle()

    def forward(self, x):
        return self.act(self.lin(x))


def test_unsupported_op_is_named_with_where_it_is(tmp_path):
    x = torch.randn(2, 4)
    gm = _inject(lora_fx.capture(_WithCustomOp(), (x,)), ["lin"])
    with pytest.raises(OnnxExportError, match=r"op lora_fx_test\.wiggle\.default .*at 'act'"):
        export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(mlp, tmp_path, monkeypatch):
    gm, x = mlp
    real_save = _onnx_ir.ir.save

    def full_disk(model, path, **kwargs):
        real_save(model, path, **kwargs)  # a complete temp file...
        raise OSError(28, "No space left on device")  # ...then the disk fills up

    monkeypatch.setattr(_onnx_ir.ir, "save", full_disk)
    with pytest.raises(OnnxExportError, match="No space left on device; nothing was written"):
        export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_are_refused_before_exporting(mlp, tmp_path):
    gm, x = mlp
    with pytest.raises(OnnxExportError, match=r"folder .*missing' does not exist"):
        export_onnx(gm, (x,), tmp_path / "missing" / "m.onnx")
    with pytest.raises(OnnxExportError, match="it is a folder"):
        export_onnx(gm, (x,), tmp_path)


def test_static_capture_cannot_export_dynamic_shapes(mlp, tmp_path):
    gm, x = mlp
    with pytest.raises(OnnxExportError, match=r"captured with static shapes.*dynamic_shapes="):
        export_onnx(gm, (x,), tmp_path / "m.onnx", dynamic_shapes={"x": {0: Dim("batch")}})


def test_bad_arguments_and_adapters(mlp, tmp_path):
    gm, x = mlp
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="pass merged=False with it"):
        export_onnx(gm, (x,), path, lora_layout="inputs")
    with pytest.raises(ValueError, match="lora_layout='rows' is invalid"):
        export_onnx(gm, (x,), path, merged=False, lora_layout="rows")
    with pytest.raises(
        AdapterError,
        match=r"unknown adapter\(s\) \['nope'\]; adapters on this graph: \['default'\]",
    ):
        export_onnx(gm, (x,), path, adapter_names=["nope"])
    plain = lora_fx.capture(TinyMLP(), (x,))
    with pytest.raises(AdapterError, match="needs an adapter"):
        export_onnx(plain, (x,), path, merged=False, lora_layout="stacked")
    saved = copy.deepcopy(TinyMLP())
    with_copy = lora_fx.capture(saved, (x,))
    lora_fx.inject(with_copy, LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    with pytest.raises(AdapterError, match="modules_to_save"):
        export_onnx(with_copy, (x,), path, merged=False, lora_layout="inputs")
    dora = lora_fx.capture(TinyMLP(), (x,))
    lora_fx.inject(dora, LoraConfig(target_modules=["lin0"], use_dora=True))
    with pytest.raises(UnsupportedSiteError, match="'default' has DoRA at 'lin0'"):
        export_onnx(dora, (x,), path, merged=False, lora_layout="inputs")  # merged: folded
    assert not path.exists()


# ---- crash safety: the .onnx is read with the data file written with it ------------------------


def _two_exports(mlp, tmp_path):
    """The same graph exported with two sets of LoRA weights (external data), and their outputs."""
    gm, x = mlp
    refs = []
    for i in range(2):
        with torch.no_grad():
            gm.lin0.lora_B.default.weight.mul_(-3.0 if i else 1.0)
        out = export_onnx(gm, (x,), tmp_path / f"ref{i}" / "mlp.onnx", external_data=True)
        refs.append((out.path, _ort(out.path, {"x": x.numpy()}).numpy()))
    assert not np.array_equal(refs[0][1], refs[1][1])
    return x, refs


def test_export_killed_between_data_and_onnx_keeps_the_old_pair(mlp, tmp_path, monkeypatch):
    for name in ("ref0", "ref1", "dest"):
        (tmp_path / name).mkdir()
    x, refs = _two_exports(mlp, tmp_path)
    dest = tmp_path / "dest" / "mlp.onnx"
    _onnx_ir.save_atomic(ir.load(refs[0][0]), dest, True)
    real = _onnx_ir.os.replace

    def killed_before_onnx(src, dst):
        if str(dst) == str(dest):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(_onnx_ir.os, "replace", killed_before_onnx)
    with pytest.raises(KeyboardInterrupt):
        _onnx_ir.save_atomic(ir.load(refs[1][0]), dest, True)
    out = ort_session(dest, device="cpu").run(None, {"x": x.numpy()})[0]
    assert np.array_equal(out, refs[0][1])


def test_export_killed_at_random_moments_leaves_old_or_new(mlp, tmp_path):
    for name in ("ref0", "ref1", "dest"):
        (tmp_path / name).mkdir()
    x, refs = _two_exports(mlp, tmp_path)
    models = [ir.load(path) for path, _ in refs]
    dest = tmp_path / "dest" / "mlp.onnx"
    _onnx_ir.save_atomic(models[0], dest, True)

    def check() -> str:
        out = ort_session(dest, device="cpu").run(None, {"x": x.numpy()})[0]
        return next(
            (str(i) for i, (_, ref) in enumerate(refs) if np.array_equal(out, ref)), "mixed"
        )

    # save_atomic is export_onnx's whole write step (the export before it writes nothing).
    outcomes, writes = kill_loop(lambda i: _onnx_ir.save_atomic(models[i], dest, True), check)
    assert set(outcomes) <= {"0", "1"}, outcomes
    assert writes > 10, "the writer was killed before it wrote"
    data = _onnx_ir.save_atomic(models[1], dest, True)  # removes what the killed writers left
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mlp.onnx", data.name]


# ---- with_past: the generation graph as a decoder with past/present KV tensors ----------------

PAST_NAMES = [f"past_key_values.{i}.{kind}" for i in (0, 1) for kind in ("key", "value")]


@pytest.fixture(scope="module")
def generation_graph():
    """A tiny Llama captured for generation with two adapters: cat (all-linear), dog (q, v)."""
    torch.manual_seed(0)
    gm = lora_fx.capture_for_generation(tiny_llama().eval(), max_batch_size=3, max_cache_len=32)
    _inject(gm, "all-linear", "cat")
    _inject(gm, ["q_proj", "v_proj"], "dog", r=2, alpha=4)
    return gm


def _decode_with_past(session, gm, ids, mask, options=None, steps=3):
    """Prefill then greedy decode in onnxruntime and in torch (static cache); both logits and
    presents are compared at each step, real (not padding) query rows only."""
    spec = gm.meta["lora_fx_generation"]
    batch = ids.shape[0]
    past = {
        name: np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        for name in PAST_NAMES
    }
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for _ in range(steps + 1):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        feed["position_ids"] = positions.numpy()
        logits, *presents = session.run(None, {**feed, **past}, options)
        expected = _torch(gm, ids, mask, positions)
        real = mask[:, -ids.shape[1] :].bool()
        assert_close(torch.from_numpy(logits)[real], expected[real])
        total = mask.shape[1]
        for name, present in zip(PAST_NAMES, presents, strict=True):
            layer, kind = name.split(".")[1:]
            buffer = getattr(gm.lora_fx_kv_cache, f"{kind}_{layer}")[:batch, :, :total]
            assert_close(torch.from_numpy(present), buffer)
        past = dict(zip(PAST_NAMES, presents, strict=True))
        ids = torch.from_numpy(logits[:, -1].argmax(-1))[:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1)
        positions = positions[:, -1:] + 1
    return expected


def _left_padded_prompts():
    ids = torch.randint(3, 256, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return ids, mask


def test_with_past_merged_matches_torch_prefill_then_decode(generation_graph, tmp_path):
    gm = generation_graph
    lora_fx.set_adapter(gm, "cat")
    result = export_onnx(gm, None, tmp_path / "decoder.onnx", with_past=True)
    assert result.layout == "merged" and result.adapters == ("cat",)
    assert not any(op.startswith("Lora") for op in result.op_counts)
    ids, mask = _left_padded_prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with lora_fx.disable_adapters(gm):
        base = _torch(gm, ids, mask, positions)
    assert_differs(_torch(gm, ids, mask, positions), base)  # the merged adapter matters
    _decode_with_past(ort_session(result.path, device="cpu"), gm, ids, mask)


def test_with_past_inputs_layout_serves_each_adapter_from_one_session(generation_graph, tmp_path):
    gm = generation_graph
    path = tmp_path / "decoder.onnx"
    result = export_onnx(gm, None, path, merged=False, lora_layout="inputs", with_past=True)
    assert result.adapters == ("cat", "dog")
    session = ort_session(path, device="cpu")
    ids, mask = _left_padded_prompts()
    outs = {}
    for name in ("cat", "dog"):
        write_ort_adapter(gm, tmp_path / f"{name}.onnx_adapter", name, model=path)
        lora_fx.set_adapter(gm, name)
        options = ort_run_options(tmp_path / f"{name}.onnx_adapter")
        outs[name] = _decode_with_past(session, gm, ids, mask, options, steps=2)
    assert_differs(outs["cat"], outs["dog"])
    lora_fx.set_adapter(gm, "cat")


def test_with_past_names_inputs_outputs_and_dims_for_generation_runtimes(
    generation_graph, tmp_path
):
    result = export_onnx(generation_graph, None, tmp_path / "decoder.onnx", with_past=True)
    assert result.inputs == ("input_ids", "attention_mask", "position_ids", *PAST_NAMES)
    presents = [name.replace("past_key_values", "present") for name in PAST_NAMES]
    assert result.outputs == ("logits", *presents)
    graph = onnx.load(str(result.path), load_external_data=False).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", 256]
    # no initializer is the cache: it is an input now
    assert not any("kv_cache" in name for name in _initializers(result.path))


def test_with_past_refuses_a_graph_without_kv_cache(tmp_path):
    ids = torch.randint(0, 256, (1, 5))
    gm = lora_fx.capture(tiny_llama().eval(), (ids,), HF_KW)
    with pytest.raises(OnnxExportError, match=r"capture_for_generation.*with_past=False"):
        export_onnx(gm, None, tmp_path / "m.onnx", with_past=True)
    assert not (tmp_path / "m.onnx").exists()


def test_with_past_refuses_stacked_and_example_args(generation_graph, tmp_path):
    with pytest.raises(ValueError, match="not 'stacked'"):
        export_onnx(
            generation_graph,
            None,
            tmp_path / "m.onnx",
            merged=False,
            lora_layout="stacked",
            with_past=True,
        )
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="pass args=None"):
        export_onnx(generation_graph, (ids, ids, ids), tmp_path / "m.onnx", with_past=True)


def test_with_past_runs_past_the_captured_cache_length(tmp_path):
    # Nothing in the file is sized by max_cache_len: 40 + 2 tokens through a graph captured
    # with an 8-token cache give the eager model's logits.
    model = tiny_llama().eval()
    gm = lora_fx.capture_for_generation(model, max_batch_size=2, max_cache_len=8)
    result = export_onnx(gm, None, tmp_path / "decoder.onnx", with_past=True)
    session = ort_session(result.path, device="cpu")
    ids = torch.randint(3, 256, (2, 42))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    prompt, rest = ids[:, :40], ids[:, 40:]
    past = {name: np.zeros((2, 2, 0, 16), np.float32) for name in PAST_NAMES}
    feed = {"input_ids": prompt.numpy(), "attention_mask": np.ones((2, 40), np.int64)}
    feed["position_ids"] = np.arange(40)[None].repeat(2, 0)
    logits, *presents = session.run(None, {**feed, **past})
    assert_close(torch.from_numpy(logits), expected[:, :40])
    assert presents[0].shape == (2, 2, 40, 16)
    for step in range(2):
        feed = {"input_ids": rest[:, step : step + 1].numpy()}
        feed["attention_mask"] = np.ones((2, 41 + step), np.int64)
        feed["position_ids"] = np.full((2, 1), 40 + step)
        logits, *presents = session.run(
            None, {**feed, **dict(zip(PAST_NAMES, presents, strict=True))}
        )
        assert_close(torch.from_numpy(logits[:, 0]), expected[:, 40 + step])


class _KeylessOutput:
    """An output class registered without `flatten_with_keys_fn`, as diffusers registers its own."""

    def __init__(self, sample: torch.Tensor, extra: torch.Tensor) -> None:
        self.sample, self.extra = sample, extra


torch.utils._pytree.register_pytree_node(
    _KeylessOutput, lambda o: ([o.sample, o.extra], None), lambda leaves, _: _KeylessOutput(*leaves)
)


class _KeylessModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> _KeylessOutput:
        y = self.lin(x)
        return _KeylessOutput(y * 2, y + 1)


def test_output_classes_without_path_keys_export_with_positional_names(tmp_path):
    x = torch.randn(2, 4)
    gm = lora_fx.capture(_KeylessModel().eval(), (x,))
    lora_fx.inject(gm, LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    out = export_onnx(gm, (x,), tmp_path / "m.onnx", merged=False)
    assert out.outputs == ("output_0", "output_1")
    expected = gm(x)
    got = ort_session(out.path, device="cpu").run(None, {"x": x.numpy()})
    assert_close(torch.from_numpy(got[0]), expected.sample)
    assert_close(torch.from_numpy(got[1]), expected.extra)
