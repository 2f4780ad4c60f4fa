"""PEFT 0.21.2's LoRA variants against PEFT itself: MiCA.

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
from models import TinyMLP

import lora_fx
from lora_fx import LoraConfig, UnsupportedSiteError

_FEATURES = (16, 24, 12)
_TARGETS = ["lin0", "lin1"]


def _mlp():
    torch.manual_seed(0)
    model = TinyMLP(features=_FEATURES).eval()
    x = torch.randn(5, _FEATURES[0])
    return model, x, lora_fx.capture(copy.deepcopy(model), (x,))


def _both(model, gm, cfg):
    """PEFT and lora_fx on the same weights, each seeded the same way just before injecting."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).eval()
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**cfg))
    return pm, gm


def _peft_name(name: str) -> str:
    """PEFT's in-memory name of a graph parameter (adapted base weights sit under base_layer)."""
    if ".lora_" not in name and name.endswith(".weight"):
        name = name[: -len(".weight")] + ".base_layer.weight"
    return "base_model.model." + name


def _assert_tensors_equal_peft(gm, pm, *, atol: float = 0.0) -> int:
    """Every graph tensor PEFT also holds equals PEFT's; returns how many were compared."""
    theirs = pm.state_dict()
    compared = 0
    for name, value in gm.state_dict().items():
        if _peft_name(name) in theirs:
            torch.testing.assert_close(value, theirs[_peft_name(name)], atol=atol, rtol=0)
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
    pm, gm = _both(model, gm, _MICA)
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
    pm, gm = _both(model, gm, _MICA)
    ours = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    theirs = sorted(
        n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad
    )
    assert ours == theirs == ["lin0.lora_A.default.weight", "lin1.lora_A.default.weight"]
    lora_fx.set_adapter(gm, "default")  # a re-sync keeps B frozen
    assert not gm.get_submodule("lin0").lora_B["default"].weight.requires_grad


def test_mica_outputs_merge_and_files_match_peft(tmp_path):
    model, x, gm = _mlp()
    pm, gm = _both(model, gm, _MICA)
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
