"""diffusers models: ONNX export of adapted UNet / VAE / SD3 / Flux graphs, and diffusers' LoRA
file format (`pytorch_lora_weights.safetensors`, config in the header) against diffusers' own
`save_lora_adapter` / `load_lora_adapter`."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import lora_roles
from models import tiny_diffusers
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

import lora_fx
from lora_fx import AdapterError, ConfigError, LoraConfig
from lora_fx.core.files import DIFFUSERS_METADATA_KEY, DIFFUSERS_NAME
from lora_fx.exporters import export_onnx, ort_session

pytest.importorskip("diffusers")

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
# diffusers 0.42's model-level load_lora_adapter looks for a .bin file unless told safetensors.
DIFFUSERS_LOAD = {"prefix": None, "weight_name": DIFFUSERS_NAME}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sample(out) -> torch.Tensor:
    """The output tensor of a diffusers model (`out.sample`, or a tuple's first)."""
    return out[0] if isinstance(out, tuple) else out.sample


def _run(model, args, kwargs=None) -> torch.Tensor:
    with torch.no_grad():
        return _sample(model(*args, **(kwargs or {})))


def _unet():
    model, args, _ = tiny_diffusers("unet")
    return model, args


def _graph_snapshot(gm):
    return (
        gm.code,
        lora_roles(gm),
        {k: v.clone() for k, v in gm.state_dict().items()},
        repr(gm.meta.get("lora_fx")),
    )


def _assert_unchanged(gm, snapshot):
    code, roles, tensors, state = snapshot
    assert gm.code == code and lora_roles(gm) == roles and repr(gm.meta.get("lora_fx")) == state
    now = gm.state_dict()
    assert set(now) == set(tensors) and all(torch.equal(now[k], v) for k, v in tensors.items())


# ---- ONNX --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet", "vae", "sd3", "flux"])
def test_onnx_export_of_adapted_diffusers_models_matches_torch(name, tmp_path, one_onnx_registry):
    model, args, kwargs = tiny_diffusers(name)
    base = _run(model, args, kwargs)
    gm = lora_fx.capture(model, args, kwargs)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    lora_fx.inject(gm, cfg).eval()
    expected = _run(gm, args, kwargs)
    assert_differs(expected, base)
    inputs = [t.numpy() for t in (*args, *kwargs.values())]
    for merged in (True, False):
        out = export_onnx(gm, args, tmp_path / f"{merged}.onnx", merged=merged, kwargs=kwargs)
        # diffusers' output dataclass field; UNet and VAE take an input of that name too
        assert out.outputs == ("output_sample" if "sample" in out.inputs else "sample",)
        assert bool(out.lora_tensors) is not merged
        session = ort_session(out.path, device="cpu")
        got = session.run(None, dict(zip(out.inputs, inputs, strict=True)))[0]
        assert_close(torch.from_numpy(got), expected)


# ---- diffusers' file format --------------------------------------------------------------------


def test_diffusers_saved_file_loads_with_diffusers_outputs(tmp_path):
    model, args = _unet()
    base = _run(model, args)
    gm = lora_fx.capture(copy.deepcopy(model), args)
    folder = lora_fx.capture(copy.deepcopy(model), args)
    model.add_adapter(
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    )
    model.save_lora_adapter(tmp_path)
    expected = _run(model, args)
    assert_differs(expected, base)

    lora_fx.load_adapter(gm, tmp_path / DIFFUSERS_NAME)  # the file
    lora_fx.load_adapter(folder, tmp_path)  # or its folder

    assert_close(_run(gm, args), expected)
    assert_close(_run(folder, args), expected)
    record = gm.meta["lora_fx"].adapters["default"]
    peft_layers = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert set(record.sites) == peft_layers and record.config.lora_alpha == 8
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in record.sites


def test_our_diffusers_file_loads_in_diffusers_with_alpha_over_r(tmp_path):
    model, args = _unet()
    gm = lora_fx.capture(copy.deepcopy(model), args)
    again = lora_fx.capture(copy.deepcopy(model), args)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=ATTN, init_lora_weights=False)
    lora_fx.inject(gm, cfg)
    lora_fx.save_adapter(gm, tmp_path, format="diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == [DIFFUSERS_NAME]  # no temp file left

    with safetensors.safe_open(str(tmp_path / DIFFUSERS_NAME), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert json.loads(header[DIFFUSERS_METADATA_KEY])["lora_alpha"] == 16

    model.load_lora_adapter(tmp_path, **DIFFUSERS_LOAD)
    scales = {m.scaling["default_0"] for m in model.modules() if hasattr(m, "scaling")}
    assert scales == {4.0}  # alpha / r, from the header
    assert_close(_run(model, args), _run(gm, args))

    lora_fx.load_adapter(again, tmp_path, "back")  # and lora_fx reads it back exactly
    assert_close(_run(again, args), _run(gm, args))


def test_peft_folder_loses_alpha_in_diffusers_the_documented_trap(tmp_path):
    """diffusers 0.42 reads `lora_adapter_metadata` from the file and overwrites `metadata=`
    with it (None for PEFT's files), then infers alpha = r: scale 1.0 instead of alpha / r."""
    model, args = _unet()
    gm = lora_fx.capture(copy.deepcopy(model), args)
    lora_fx.inject(gm, LoraConfig(r=4, lora_alpha=16, target_modules=ATTN, init_lora_weights=False))
    lora_fx.save_adapter(gm, tmp_path)  # PEFT layout
    config = json.loads((tmp_path / "adapter_config.json").read_text())

    trap = copy.deepcopy(model)
    trap.load_lora_adapter(
        tmp_path,
        prefix="base_model.model",
        weight_name="adapter_model.safetensors",
        metadata=config,
    )
    scales = {m.scaling["default_0"] for m in trap.modules() if hasattr(m, "scaling")}
    assert scales == {1.0}
    assert_differs(_run(trap, args), _run(gm, args))


# ---- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def unet_graph():
    model, args = _unet()
    gm = lora_fx.capture(model, args)
    lora_fx.inject(gm, LoraConfig(r=4, target_modules=ATTN, init_lora_weights=False), "kept")
    return gm


def _write(path, tensors, metadata):
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _our_file(gm, folder):
    lora_fx.save_adapter(gm, folder, "kept", format="diffusers")
    return safetensors.torch.load_file(str(folder / DIFFUSERS_NAME))


def test_files_without_or_with_garbled_metadata_are_refused(unet_graph, tmp_path):
    tensors = _our_file(unet_graph, tmp_path / "ok")
    snapshot = _graph_snapshot(unet_graph)
    cases = [
        (
            {"format": "pt"},
            AdapterError,
            r"has no 'lora_adapter_metadata' header; expected a diffusers LoRA file",
        ),
        (
            {DIFFUSERS_METADATA_KEY: "{r: 4"},
            ConfigError,
            r"'lora_adapter_metadata' in .* is not JSON",
        ),
        (
            {DIFFUSERS_METADATA_KEY: '{"r": "four"}'},
            ConfigError,
            r"r='four' is invalid.*in the 'lora_adapter_metadata' header",
        ),
        ({DIFFUSERS_METADATA_KEY: '{"peft_type": "LOHA"}'}, ConfigError, r"peft_type='LOHA'"),
    ]
    for i, (metadata, error, match) in enumerate(cases):
        path = _write(tmp_path / f"{i}.safetensors", tensors, metadata)
        with pytest.raises(error, match=match):
            lora_fx.load_adapter(unet_graph, path, "new")
        assert issubclass(error, ValueError)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(AdapterError, match=r"cannot read .*junk.safetensors.*expected a diffusers"):
        lora_fx.load_adapter(unet_graph, tmp_path / "junk.safetensors", "new")
    with pytest.raises(AdapterError, match=r"no adapter_config.json in .*or a diffusers LoRA"):
        lora_fx.load_adapter(unet_graph, tmp_path / "missing", "new")
    _assert_unchanged(unet_graph, snapshot)


def test_keys_that_fit_no_site_are_refused_and_the_graph_is_unchanged(unet_graph, tmp_path):
    tensors = _our_file(unet_graph, tmp_path)
    header = {DIFFUSERS_METADATA_KEY: json.dumps({"r": 4, "target_modules": ATTN})}
    pipeline_keys = {f"unet.{k}": v for k, v in tensors.items()}  # a pipeline-level file
    snapshot = _graph_snapshot(unet_graph)
    for name, file_tensors, match in [
        (
            "pipe",
            pipeline_keys,
            r"\(diffusers layout\) does not fit this graph: missing \d+ tensors.*\d+ tensors that fit no site, e.g. \['unet\.down_blocks.* \(keys here look like 'down_blocks\.",
        ),
        (
            "kept",
            {**tensors, "extra.lora_A.weight": torch.ones(1)},
            r"1 tensors that fit no site, e.g. \['extra.lora_A.weight'\]",
        ),
    ]:
        path = _write(tmp_path / f"{name}.safetensors", file_tensors, header)
        with pytest.raises(AdapterError, match=match):
            lora_fx.load_adapter(unet_graph, path, name)
        _assert_unchanged(unet_graph, snapshot)


def test_unknown_format_lists_the_choices(unet_graph, tmp_path):
    with pytest.raises(
        ValueError, match=r"format='kohya' is unknown; choose one of \['peft', 'diffusers'\]"
    ):
        lora_fx.save_adapter(unet_graph, tmp_path, "kept", format="kohya")
    assert not list(tmp_path.iterdir())
