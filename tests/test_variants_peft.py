"""PEFT 0.21.2's LoRA variants against PEFT itself: MiCA and KaSA.

Each case builds PEFT and lora_fx on the same weights and seed, checks the tensors the init wrote
(and the base weight it leaves), then makes the adapter non-trivial with the same values on both
sides and checks outputs, merge, trainable tensors and files both ways.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import peft_and_lora_fx, peft_param_name
from models import TinyMLP

import lora_fx
from lora_fx import ConfigError, KasaConfig, LoraConfig, UnsupportedSiteError

_FEATURES = (16, 24, 12)
_TARGETS = ["lin0", "lin1"]


def _mlp():
    torch.manual_seed(0)
    model = TinyMLP(features=_FEATURES).eval()
    x = torch.randn(5, _FEATURES[0])
    return model, x, lora_fx.capture(copy.deepcopy(model), (x,))


def _assert_tensors_equal_peft(gm, pm, *, atol: float = 0.0) -> int:
    """Every graph tensor PEFT also holds equals PEFT's; returns how many were compared."""
    theirs = pm.state_dict()
    compared = 0
    for name, value in gm.state_dict().items():
        if peft_param_name(name) in theirs:
            torch.testing.assert_close(value, theirs[peft_param_name(name)], atol=atol, rtol=0)
            compared += 1
    return compared


def _set_a(gm, pm, *, holder: str = "lora_A") -> None:
    """The same random A on both sides (the trained state; MiCA's A starts at zero)."""
    for site in _TARGETS:
        value = torch.randn_like(getattr(gm.get_submodule(site), holder)["default"].weight)
        with torch.no_grad():
            getattr(gm.get_submodule(site), holder)["default"].weight.copy_(value)
            getattr(pm.base_model.model.get_submodule(site), holder)["default"].weight.copy_(value)


# ---------------------------------------------------------------------------------------- MiCA
_MICA = {"target_modules": _TARGETS, "r": 4, "lora_alpha": 8, "init_lora_weights": "mica"}


def test_mica_init_matches_peft():
    model, x, gm = _mlp()
    pm, gm = peft_and_lora_fx(model, gm, _MICA)
    # A, B and the (unchanged) base weight of both sites; SVD signs agree on one machine
    assert _assert_tensors_equal_peft(gm, pm) == 6
    for site in _TARGETS:
        assert torch.equal(gm.get_submodule(site).weight, model.get_submodule(site).weight)
        assert torch.count_nonzero(gm.get_submodule(site).lora_A["default"].weight) == 0
    with torch.no_grad():
        assert_close(gm(x), model(x))  # B @ A == 0: the base model
        assert_close(gm(x), pm(x))


def test_mica_trains_only_a_like_peft():
    model, _, gm = _mlp()
    pm, gm = peft_and_lora_fx(model, gm, _MICA)
    ours = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    theirs = sorted(
        n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad
    )
    assert ours == theirs == ["lin0.lora_A.default.weight", "lin1.lora_A.default.weight"]
    lora_fx.set_adapter(gm, "default")  # a re-sync keeps B frozen
    assert not gm.get_submodule("lin0").lora_B["default"].weight.requires_grad


def test_mica_outputs_merge_and_files_match_peft(tmp_path):
    model, x, gm = _mlp()
    pm, gm = peft_and_lora_fx(model, gm, _MICA)
    _set_a(gm, pm)
    with torch.no_grad():
        expected = pm(x)
        assert_differs(expected, model(x))
        assert_close(gm(x), expected)
    # PEFT -> lora_fx
    pm.save_pretrained(tmp_path / "peft")
    loaded = lora_fx.load_adapter(_mlp()[2], tmp_path / "peft")
    assert not loaded.get_submodule("lin1").lora_B["default"].weight.requires_grad
    with torch.no_grad():
        assert_close(loaded(x), expected)
    # lora_fx -> PEFT
    lora_fx.save_adapter(gm, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(x), expected)
        merged = lora_fx.merge_and_unload(gm)
        assert_close(merged(x), pm.merge_and_unload()(x))


def test_mica_rank_above_the_weight_is_refused():
    _, _, gm = _mlp()
    cfg = LoraConfig(target_modules=["lin1"], r=13, init_lora_weights="mica")
    with pytest.raises(UnsupportedSiteError, match="init_lora_weights='mica'.*r=13"):
        lora_fx.inject(gm, cfg)


# ---------------------------------------------------------------------------------------- KaSA
_KASA = {"target_modules": _TARGETS, "r": 4, "lora_alpha": 8, "kasa_config": {"gamma": 0.01}}


def _kasa_pair():
    model, x, gm = _mlp()
    cfg = {**_KASA, "init_lora_weights": False}  # B random too: a non-trivial adapter
    torch.manual_seed(1)
    peft_cfg = peft.LoraConfig(**{**cfg, "kasa_config": peft.KasaConfig(gamma=0.01)})
    pm = peft.get_peft_model(copy.deepcopy(model), peft_cfg).eval()
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**cfg))
    return model, x, gm, pm


def test_kasa_init_truncates_the_base_weight_like_peft():
    model, x, gm = _mlp()
    pm, gm = peft_and_lora_fx(model, gm, _KASA)
    # A, B, lora_diag (same RNG draws in the same order) and the truncated base weight
    assert _assert_tensors_equal_peft(gm, pm, atol=1e-6) == 8
    for site in _TARGETS:
        weight = gm.get_submodule(site).weight
        assert torch.linalg.matrix_rank(weight) == min(weight.shape) - 4
        assert gm.get_submodule(site).lora_diag["default"].shape == (4,)
    with torch.no_grad():
        assert_differs(gm(x), model(x))  # the truncation changes the base output
        assert_close(gm(x), pm(x))


def test_kasa_outputs_gradients_and_merge_match_peft():
    _, x, gm, pm = _kasa_pair()
    with torch.no_grad():
        expected = pm(x)
        assert_close(gm(x), expected)
    ours = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    theirs = sorted(
        n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad
    )
    assert ours == theirs and "lin0.lora_diag.default" in ours
    gm(x).sum().backward()
    pm(x).sum().backward()
    diag_grad = pm.base_model.model.lin0.lora_diag["default"].grad
    assert_close(gm.get_submodule("lin0").lora_diag["default"].grad, diag_grad)
    with torch.no_grad():
        lora_fx.merge(gm)
        assert_close(gm(x), expected)
        assert_close(gm.get_submodule("lin1").weight, pm.merge_and_unload().lin1.weight)
        lora_fx.unmerge(gm)
        assert_close(gm(x), expected)


def test_kasa_files_both_ways(tmp_path):
    model, x, gm, pm = _kasa_pair()
    with torch.no_grad():
        expected = pm(x)
    # PEFT -> lora_fx: loading truncates the fresh base (as PEFT's from_pretrained) and reads
    # lora_diag from `<site>.lora_diag`
    pm.save_pretrained(tmp_path / "peft")
    loaded = lora_fx.load_adapter(_mlp()[2], tmp_path / "peft")
    assert loaded.get_submodule("lin0").lora_diag["default"].requires_grad
    with torch.no_grad():
        assert_close(loaded(x), expected)
    assert LoraConfig.from_json(tmp_path / "peft" / "adapter_config.json").kasa_config == {
        "beta": 1e-4,
        "gamma": 0.01,
    }
    # lora_fx -> PEFT
    lora_fx.save_adapter(gm, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(x), expected)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"kasa_config": {"beta": -1.0}}, "kasa_config beta=-1.0 is invalid"),
        ({"kasa_config": KasaConfig(), "use_dora": True}, "kasa_config .*use_dora"),
        ({"kasa_config": {}, "init_lora_weights": "pissa"}, "kasa_config needs init_lora"),
    ],
)
def test_kasa_bad_config_is_refused(cfg, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(target_modules=_TARGETS, **cfg)


def test_kasa_rank_without_a_kept_direction_and_mixing_are_refused():
    _, _, gm = _mlp()
    before = gm.lin1.weight.clone()
    with pytest.raises(UnsupportedSiteError, match="kasa_config needs r < .*'lin1'"):
        lora_fx.inject(gm, LoraConfig(target_modules=["lin1"], r=12, kasa_config={}))
    assert torch.equal(gm.lin1.weight, before)
    lora_fx.inject(gm, LoraConfig(target_modules=["lin1"], r=2, kasa_config={}))
    with pytest.raises(ConfigError, match="cannot be combined with adapters"):
        lora_fx.inject(gm, LoraConfig(target_modules=["lin0"]), "plain")
