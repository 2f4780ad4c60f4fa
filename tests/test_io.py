import json
import os

import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from models import TinyConv, TinyMLP

import lora_fx
from lora_fx import AdapterError, ConfigError, LoraConfig


def _trained(model, x, **cfg):
    gm = lora_fx.capture(model, (x,))
    lora_fx.inject(gm, LoraConfig(init_lora_weights=False, **cfg))
    return gm


def test_save_then_load_round_trips_exactly(tmp_path):
    x = torch.randn(4, 10)
    model = TinyMLP().eval()
    gm = _trained(model, x, target_modules=["lin0", "lin1"], lora_bias=True, modules_to_save=None)
    adapted = gm(x).detach()
    lora_fx.save_adapter(gm, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = lora_fx.capture(TinyMLP().eval(), (x,))
    fresh.load_state_dict(
        {k: v for k, v in gm.state_dict().items() if ".lora_" not in k}, strict=False
    )  # same base weights
    lora_fx.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), adapted)


def test_saved_keys_are_peft_keys(tmp_path):
    gm = _trained(TinyConv().eval(), torch.randn(1, 3, 6, 6), target_modules=["conv0", "lin0"])
    lora_fx.save_adapter(gm, tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {
        "base_model.model.conv0.lora_A.weight",
        "base_model.model.conv0.lora_B.weight",
        "base_model.model.lin0.lora_A.weight",
        "base_model.model.lin0.lora_B.weight",
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["conv0", "lin0"]


def test_load_into_existing_slot_replaces_weights(tmp_path):
    x = torch.randn(4, 10)
    model = TinyMLP().eval()
    gm = _trained(model, x, target_modules=["lin0"])
    lora_fx.save_adapter(gm, tmp_path)
    saved = gm(x).detach()
    with torch.no_grad():
        gm.lin0.lora_B.default.weight.zero_()
    assert_differs(gm(x), saved)
    lora_fx.load_adapter(gm, tmp_path)
    assert torch.equal(gm(x), saved)


def test_bin_files_are_read_weights_only(tmp_path):
    x = torch.randn(4, 10)
    gm = _trained(TinyMLP().eval(), x, target_modules=["lin0"])
    lora_fx.save_adapter(gm, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    fresh = lora_fx.capture(TinyMLP().eval(), (x,))
    lora_fx.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.lin0.lora_B.default.weight, gm.lin0.lora_B.default.weight)


def _unchanged(gm):
    return gm.code, {n: p.detach().clone() for n, p in gm.named_parameters()}, "lora_fx" in gm.meta


def _assert_unchanged(gm, snapshot):
    code, params, had_state = snapshot
    assert gm.code == code and ("lora_fx" in gm.meta) == had_state
    assert set(dict(gm.named_parameters())) == set(params)
    for name, param in gm.named_parameters():
        assert torch.equal(param, params[name])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda t: t.pop("base_model.model.lin0.lora_A.weight"),
            r"missing 1 tensors, e.g. \['base_model.model.lin0.lora_A",
        ),
        (
            lambda t: t.update({"base_model.model.nope.lora_A.weight": torch.zeros(1)}),
            r"1 tensors that fit no site",
        ),
        (
            lambda t: t.update({"base_model.model.lin0.lora_A.weight": torch.zeros(8, 11)}),
            r"mis-shaped tensors, e.g. \['base_model.model.lin0.lora_A.weight: file \(8, 11\) vs graph \(8, 10\)'\]",
        ),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_bad_tensors_raise_and_change_nothing(tmp_path, edit, match, existing):
    x = torch.randn(4, 10)
    gm = _trained(TinyMLP().eval(), x, target_modules=["lin0"])
    lora_fx.save_adapter(gm, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    edit(tensors)
    safetensors.torch.save_file(tensors, tmp_path / "adapter_model.safetensors")
    target = gm if existing else lora_fx.capture(TinyMLP().eval(), (x,))
    snapshot = _unchanged(target)
    with pytest.raises(AdapterError, match=match):
        lora_fx.load_adapter(target, tmp_path)
    _assert_unchanged(target, snapshot)


def test_missing_files_and_bad_config(tmp_path):
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    with pytest.raises(
        AdapterError, match=r"no adapter_config.json in .*; expected a PEFT adapter folder"
    ):
        lora_fx.load_adapter(gm, tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "target_modules": ["lin0"]})
    )
    with pytest.raises(AdapterError, match=r"no adapter_model.safetensors or adapter_model.bin"):
        lora_fx.load_adapter(gm, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ConfigError, match=r"peft_type='PREFIX_TUNING'"):
        lora_fx.load_adapter(gm, tmp_path)
    assert "lora_fx" not in gm.meta


def test_save_errors_and_atomic_write(tmp_path, monkeypatch):
    x = torch.randn(2, 10)
    gm = _trained(TinyMLP().eval(), x, target_modules=["lin0"])
    with pytest.raises(
        AdapterError, match=r"unknown adapter 'other'; adapters on this graph: \['default'\]"
    ):
        lora_fx.save_adapter(gm, tmp_path, "other")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lora_fx.save_adapter(gm, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == [], "a failed save leaves no file behind"


def _edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"use_rslora": "false"}, ConfigError, r"use_rslora='false' is invalid; expected true"),
        ({"target_modules": r"(l)\1n0"}, ConfigError, r"target_modules=.* uses a backreference"),
        ({"rank_pattern": {"lin(": 2}}, ConfigError, r"rank_pattern key='lin\(' is not a valid"),
        ({"layers_to_transform": "0"}, ConfigError, r"layers_to_transform='0' is invalid"),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_bad_config_fields_name_field_and_file_and_change_nothing(
    tmp_path, fields, error, match, existing
):
    x = torch.randn(4, 10)
    gm = _trained(TinyMLP().eval(), x, target_modules=["lin0"])
    lora_fx.save_adapter(gm, tmp_path)
    _edit_config(tmp_path, **fields)
    target = gm if existing else lora_fx.capture(TinyMLP().eval(), (x,))
    snapshot = _unchanged(target)
    with pytest.raises(error, match=match + r".*\(in '.*adapter_config.json'\)"):
        lora_fx.load_adapter(target, tmp_path)
    _assert_unchanged(target, snapshot)


def test_catastrophic_patterns_in_a_file_load_at_once(tmp_path):
    # `re` would backtrack ~2^20 times per site name for each of these; the load takes no time.
    x = torch.randn(4, 10)
    gm = _trained(TinyMLP().eval(), x, target_modules=["lin0", "lin1"])
    lora_fx.save_adapter(gm, tmp_path)
    _edit_config(
        tmp_path,
        target_modules=r"(?:(?:l|i|n)+)+[01]",
        exclude_modules=r"(.+)+z",
        rank_pattern={"(a*)*b": 2},
    )
    fresh = lora_fx.capture(TinyMLP().eval(), (x,))
    fresh.load_state_dict(
        {k: v for k, v in gm.state_dict().items() if ".lora_" not in k}, strict=False
    )
    with pytest.warns(UserWarning, match=r"exclude_modules='\(\.\+\)\+z' matched no site"):
        lora_fx.load_adapter(fresh, tmp_path)
    assert_close(fresh(x), gm(x))


@pytest.mark.parametrize(
    ("name", "data", "error", "match"),
    [
        (
            "adapter_model.safetensors",
            lambda b: b[: len(b) // 2],
            AdapterError,
            r"cannot read '.*adapter_model.safetensors' \(SafetensorError: .*\); the file is "
            "truncated or not a tensor file",
        ),
        (
            "adapter_config.json",
            lambda b: b[:-5],
            ConfigError,
            r"'.*adapter_config.json' is not a JSON file: ",
        ),
        (
            "adapter_config.json",
            lambda b: b'["lin0"]',
            ConfigError,
            r"a JSON object of fields, got a list \(in '.*adapter_config.json'\)",
        ),
    ],
)
def test_broken_files_name_the_file_and_change_nothing(tmp_path, name, data, error, match):
    x = torch.randn(4, 10)
    gm = _trained(TinyMLP().eval(), x, target_modules=["lin0"])
    lora_fx.save_adapter(gm, tmp_path)
    (tmp_path / name).write_bytes(data((tmp_path / name).read_bytes()))
    snapshot = _unchanged(gm)
    with pytest.raises(error, match=match):
        lora_fx.load_adapter(gm, tmp_path)
    _assert_unchanged(gm, snapshot)
