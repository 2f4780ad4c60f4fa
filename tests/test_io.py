import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import kill_loop
from models import TinyConv, TinyMLP

import lora_fx
from lora_fx import AdapterError, ConfigError, LoraConfig
from lora_fx.core import files as core_files
from lora_fx.core.files import CONFIG_DIGEST_KEY, read_adapter_folder
from lora_fx.core.state import require_state


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

    monkeypatch.setattr(Path, "write_bytes", boom)  # the weights' temp file
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
    weights = tmp_path / "adapter_model.safetensors"  # an edited config: drop the pair check
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights, {"format": "pt"})
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


# ---- crash safety: a folder is the whole old or the whole new adapter, or refused -----------------


class _Killed(BaseException):
    """Stands in for SIGKILL at one point of a write."""


def test_folder_killed_between_its_two_files_is_refused(tmp_path, monkeypatch):
    x = torch.randn(2, 10)
    gm = _trained(TinyMLP().eval(), x, target_modules=["lin0"], lora_alpha=8)
    lora_fx.save_adapter(gm, tmp_path)
    require_state(gm).adapters["default"].config.lora_alpha = 16  # only the config changes
    real = core_files.os.replace

    def killed_before_config(src, dst):
        if os.path.basename(dst) == "adapter_config.json":
            raise _Killed
        real(src, dst)

    monkeypatch.setattr(core_files.os, "replace", killed_before_config)
    with pytest.raises(_Killed):
        lora_fx.save_adapter(gm, tmp_path)
    fresh = lora_fx.capture(TinyMLP().eval(), (x,))
    with pytest.raises(AdapterError, match=r"mixes two saves: adapter_model.safetensors was saved"):
        lora_fx.load_adapter(fresh, tmp_path)
    assert "lora_fx" not in fresh.meta


def test_peft_reads_a_folder_with_the_config_digest_without_warnings(tmp_path):
    from peft import PeftModel

    x = torch.randn(2, 10)
    model = TinyMLP().eval()
    gm = _trained(model, x, target_modules=["lin0", "lin1"])
    lora_fx.save_adapter(gm, tmp_path)
    with safetensors.safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert CONFIG_DIGEST_KEY in f.metadata()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert torch.allclose(peft_model(x), gm(x), atol=1e-6)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_files_follow_the_umask(tmp_path, mask):
    gm = _trained(TinyMLP().eval(), torch.randn(2, 10), target_modules=["lin0"])
    old = os.umask(mask)
    try:
        lora_fx.save_adapter(gm, tmp_path / "a")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o777 & ~mask
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_save_adapter_killed_at_random_moments_leaves_old_or_new(tmp_path):
    x = torch.randn(2, 10)
    model = TinyMLP().eval()
    graphs = [
        _trained(copy.deepcopy(model), x, target_modules=["lin0", "lin1"], lora_alpha=alpha)
        for alpha in (8, 16)
    ]
    expected = []
    for i, gm in enumerate(graphs):
        lora_fx.save_adapter(gm, tmp_path / f"ref{i}")
        cfg, tensors = read_adapter_folder(tmp_path / f"ref{i}")
        expected.append((cfg.to_dict(), tensors))
    dest = tmp_path / "dest"
    lora_fx.save_adapter(graphs[0], dest)

    def check() -> str:
        try:
            cfg, tensors = read_adapter_folder(dest)
        except AdapterError as e:
            assert "mixes two saves" in str(e)
            return "refused"
        for i, (config, ref) in enumerate(expected):
            same = cfg.to_dict() == config and tensors.keys() == ref.keys()
            if same and all(torch.equal(tensors[k], ref[k]) for k in ref):
                return str(i)
        return "mixed"

    outcomes, writes = kill_loop(lambda i: lora_fx.save_adapter(graphs[i], dest), check)
    assert set(outcomes) <= {"0", "1", "refused"}, outcomes
    assert writes > len(graphs) * 10, "the writer was killed before it wrote"
    lora_fx.save_adapter(graphs[1], dest)  # the next write removes the killed writers' temp files
    assert sorted(os.listdir(dest)) == ["adapter_config.json", "adapter_model.safetensors"]
