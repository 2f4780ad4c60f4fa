"""EVA (`initialize_eva`, PEFT's `init_lora_weights="eva"`) against PEFT 0.21.2 itself.

PEFT's incremental PCA is seeded and sign-flipped, so A is deterministic: lora_fx's A, B, ranks,
alphas and outputs equal PEFT's bitwise, on a custom MLP (both capture methods, tensor batches)
and a tiny Llama (export, dict batches with padding and `-100` labels). Files go both ways.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from models import TinyConv, TinyMLP, tiny_llama

import lora_fx
from lora_fx import CalibrationError, ConfigError, EvaConfig, LoraConfig, UnsupportedSiteError
from lora_fx.math.eva import distribute_ranks

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
_MLP = {"r": 3, "lora_alpha": 6, "target_modules": ["lin0", "lin1"], "init_lora_weights": "eva"}
_LLAMA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": "eva"}


def _mlp_batches() -> list[torch.Tensor]:
    """Inputs with two strong directions: EVA gives lin0 fewer ranks than lin1 with rho=2."""
    mix = torch.randn(10, 10) * torch.tensor([8.0, 4.0] + [0.05] * 8)[:, None]
    return [torch.randn(16, 10) @ mix for _ in range(6)]


def _peft_mlp(model, batches, eva: dict):
    """PEFT's EVA on a copy of `model` with tensor batches (no token mask)."""
    cfg = peft.LoraConfig(**_MLP, eva_config=peft.EvaConfig(**eva))
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    peft.initialize_lora_eva_weights(
        pm,
        batches,
        forward_fn=lambda m, x: m(x),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    return pm.eval()


def _assert_same_as_peft(gm, pm) -> None:
    """A, B, the config's ranks / alphas / targets, and every LoRA tensor's shape equal PEFT's."""
    theirs = pm.state_dict()
    ours = {k: v for k, v in gm.state_dict().items() if ".lora_" in k}
    assert len(ours) == len([k for k in theirs if ".lora_" in k]) > 0
    for name, value in ours.items():
        assert torch.equal(value, theirs["base_model.model." + name]), name
        if ".lora_B." in name:
            assert torch.count_nonzero(value) == 0
    peft_cfg, cfg = pm.peft_config["default"], gm.meta["lora_fx"].adapters["default"].config
    assert cfg.rank_pattern == peft_cfg.rank_pattern
    assert cfg.alpha_pattern == peft_cfg.alpha_pattern
    assert sorted(cfg.target_modules) == sorted(peft_cfg.target_modules)
    assert cfg.init_lora_weights == "eva"


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize(
    "eva",
    [
        {"rho": 1.0},
        {"rho": 2.0},
        {"rho": 2.0, "whiten": True, "adjust_scaling_factors": False, "tau": 0.9},
    ],
    ids=["rho1", "rho2", "whiten"],
)
def test_mlp_matches_peft(method, eva):
    model, batches = TinyMLP().eval(), _mlp_batches()
    pm = _peft_mlp(model, batches, eva)
    gm = lora_fx.capture(copy.deepcopy(model), (batches[0],), method=method)
    gm = lora_fx.initialize_eva(gm, LoraConfig(**_MLP, eva_config=EvaConfig(**eva)), batches)
    gm.graph.lint()
    _assert_same_as_peft(gm, pm)
    if eva["rho"] > 1:  # the ranks were redistributed, as PEFT's rank_pattern says
        assert gm.meta["lora_fx"].adapters["default"].config.rank_pattern == {"lin0": 2, "lin1": 4}
    x = torch.randn(16, 10)
    with torch.no_grad():
        assert torch.equal(gm(x), pm(x))
        assert_close(gm(x), model(x))  # B = 0: the fresh adapter is the base model
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "record" in str(n.target)]


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama, dict batches (padding, -100 labels) and EVA by PEFT and by lora_fx."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 256, (2, 12))
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "low_cpu_mem_usage=False" advice
        pm = peft.get_peft_model(
            copy.deepcopy(model), peft.LoraConfig(**_LLAMA, eva_config=peft.EvaConfig(rho=2.0))
        )
        peft.initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    first = batches[0]
    gm = lora_fx.capture(
        copy.deepcopy(model),
        (first["input_ids"],),
        {"use_cache": False, "attention_mask": first["attention_mask"]},
    )
    gm = lora_fx.initialize_eva(gm, LoraConfig(**_LLAMA, eva_config=EvaConfig(rho=2.0)), batches)
    return model, batches, pm.eval(), gm


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_llama_matches_peft(llama):
    _, batches, pm, gm = llama
    _assert_same_as_peft(gm, pm)
    ranks = gm.meta["lora_fx"].adapters["default"].config.rank_pattern
    assert ranks  # rho=2 moved ranks between sites (PEFT lists the ranks that differ from r)
    with torch.no_grad():
        assert torch.equal(_logits(gm, batches[1]), _logits(pm, batches[1]))


def _randomise_b(gm, pm) -> None:
    """The same nonzero B on both sides (a trained adapter), so files carry something."""
    for name, p in gm.named_parameters():
        if ".lora_B." in name:
            value = torch.randn_like(p)
            with torch.no_grad():
                p.copy_(value)
                pm.get_parameter("base_model.model." + name).copy_(value)


def test_llama_files_both_ways(llama, tmp_path):
    model, batches, pm, gm = llama
    pm, gm = copy.deepcopy(pm), copy.deepcopy(gm)
    _randomise_b(gm, pm)
    with torch.no_grad():
        expected = _logits(gm, batches[2])
        assert_differs(expected, _logits(model, batches[2]))
        assert_close(expected, _logits(pm, batches[2]))  # branch order of operations differs
    lora_fx.save_adapter(gm, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "theirs")
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert (
        loaded_by_peft.peft_config["default"].rank_pattern == pm.peft_config["default"].rank_pattern
    )
    first = batches[0]
    fresh = lora_fx.capture(
        copy.deepcopy(model),
        (first["input_ids"],),
        {"use_cache": False, "attention_mask": first["attention_mask"]},
    )
    loaded_by_us = lora_fx.load_adapter(fresh, tmp_path / "theirs")
    config = loaded_by_us.meta["lora_fx"].adapters["default"].config
    assert config.eva_config == EvaConfig(rho=2.0).__dict__
    with torch.no_grad():
        assert_close(_logits(loaded_by_peft, batches[2]), expected)
        assert torch.equal(_logits(loaded_by_us, batches[2]), expected)


# ------------------------------------------------------------------------------- bad input
def _fresh_mlp(method="fx"):
    batches = _mlp_batches()
    return lora_fx.capture(TinyMLP().eval(), (batches[0],), method=method), batches


def _cfg(**eva) -> LoraConfig:
    return LoraConfig(**_MLP, eva_config=EvaConfig(**eva))


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        (None, "needs calibration batches"),
        ([], "batches is empty"),
        (torch.randn(16, 10), "wrap a single batch in a list"),
        ([{"x": torch.randn(16, 10), "pixel_values": torch.randn(1)}], r"\['pixel_values'\]"),
        ([torch.randn(16, 7)], r"batch 0 does not fit the graph's inputs \['x'\]"),
        (["text"], "expected a dict of keyword inputs"),
    ],
    ids=["none", "empty", "tensor", "unknown-key", "wrong-shape", "str"],
)
def test_bad_batches_raise_and_leave_graph_unchanged(batches, match):
    gm, _ = _fresh_mlp()
    code, nodes = gm.code, [n.format_node() for n in gm.graph.nodes]
    with pytest.raises(CalibrationError, match=match):
        lora_fx.initialize_eva(gm, _cfg(), batches)
    assert gm.code == code and [n.format_node() for n in gm.graph.nodes] == nodes
    assert "lora_fx" not in gm.meta
    assert not [k for k in gm.state_dict() if ".lora_" in k]


def test_no_convergence_raises_and_leaves_graph_unchanged():
    gm, batches = _fresh_mlp("export")
    code = gm.code
    with pytest.raises(CalibrationError, match=r"did not converge \(tau=0.99\) in max_steps=1"):
        lora_fx.initialize_eva(gm, _cfg(), batches, max_steps=1)
    assert gm.code == code and "lora_fx" not in gm.meta


def test_config_errors():
    gm, batches = _fresh_mlp()
    with pytest.raises(ConfigError, match=r"call lora_fx.initialize_eva\(gm, cfg, batches\)"):
        lora_fx.inject(gm, _cfg())
    with pytest.raises(ConfigError, match="initialize_eva needs init_lora_weights='eva'"):
        lora_fx.initialize_eva(gm, LoraConfig(target_modules=["lin0"]), batches)
    with pytest.raises(ConfigError, match="rho=0.5 is invalid"):
        _cfg(rho=0.5)
    with pytest.raises(ConfigError, match="tau=2 is invalid"):
        _cfg(tau=2)
    with pytest.raises(UnsupportedSiteError, match=r"round\(r \* rho\) = 12 .* 'lin0'"):
        lora_fx.initialize_eva(gm, _cfg(rho=4.0), batches)
    conv = lora_fx.capture(TinyConv().eval(), (torch.randn(2, 3, 6, 6),))
    with pytest.raises(UnsupportedSiteError, match="'eva' is not supported on"):
        lora_fx.initialize_eva(
            conv,
            LoraConfig(target_modules=["conv0"], init_lora_weights="eva", eva_config={}),
            [torch.randn(2)],
        )
    assert "lora_fx" not in gm.meta


def test_eva_config_round_trips_and_defaults():
    with pytest.warns(UserWarning, match="without eva_config"):
        cfg = LoraConfig(init_lora_weights="eva")
    assert cfg.eva_config == {
        "rho": 2.0,
        "tau": 0.99,
        "use_label_mask": True,
        "label_mask_value": -100,
        "whiten": False,
        "adjust_scaling_factors": True,
    }
    assert LoraConfig.from_dict(cfg.to_dict()).eva_config == cfg.eva_config
    with pytest.warns(UserWarning, match="eva_config is ignored"):
        LoraConfig(eva_config=EvaConfig())


def test_distribute_ranks_by_hand():
    ratios = {"a": torch.tensor([0.5, 0.1]), "b": torch.tensor([0.3, 0.2])}
    assert distribute_ranks(ratios, {}, 3) == {"a": 1, "b": 2}
    # "c" reads "a"'s input: it counts a's ratios too, and "a" keeps the larger share
    ratios = {"a": torch.tensor([0.5, 0.45]), "b": torch.tensor([0.01, 0.0])}
    assert distribute_ranks(ratios, {"c": "a"}, 4) == {"a": 2, "b": 0, "c": 2}


def test_measures_the_base_model_beside_another_adapter():
    """As PEFT's `disable_adapter()`: an active adapter does not change what EVA measures."""
    gm, batches = _fresh_mlp()
    alone = lora_fx.initialize_eva(copy.deepcopy(gm), _cfg(), batches)
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False), "other")
    gm = lora_fx.initialize_eva(gm, _cfg(), batches, "eva")
    assert lora_fx.active_adapters(gm) == ["other"]  # a later adapter starts inactive (PEFT)
    for site in ("lin0", "lin1"):
        a = gm.get_submodule(site).lora_A["eva"].weight
        assert torch.equal(a, alone.get_submodule(site).lora_A["default"].weight)
