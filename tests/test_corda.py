"""CorDA (`initialize_corda`, PEFT's `init_lora_weights="corda"`) against PEFT 0.21.2 itself.

PEFT's `preprocess_corda` + `get_peft_model` is the oracle: A, B and the residual base weight
match to float32 rounding, and outputs after init, on a custom MLP (both capture methods) and a
tiny Llama (export), for both methods. Files go both ways, on PEFT's residual base.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import assert_init_matches_peft
from models import TinyConv, TinyMLP, tiny_llama
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.corda import preprocess_corda

import lora_fx
from lora_fx import CalibrationError, ConfigError, CordaConfig, LoraConfig, UnsupportedSiteError
from lora_fx.math.corda import corda, input_covariance

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
_MLP = {"r": 2, "lora_alpha": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": "corda"}
# PEFT's `preprocess_corda` matches names before "all-linear" is expanded: it needs the list
_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LLAMA = {"r": 4, "lora_alpha": 8, "target_modules": _LINEARS, "init_lora_weights": "corda"}
_METHODS = ["ipm", "kpm"]


def _mlp_batches() -> list[torch.Tensor]:
    return [torch.randn(16, 10) for _ in range(3)]


def _peft(model, cfg: dict, method: str, run):
    """PEFT's CorDA on a copy of `model`: covariances from `run(model)`, then the adapter."""
    config = peft.LoraConfig(**cfg, corda_config=PeftCordaConfig(corda_method=method))
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_corda(model, config, run_model=lambda: run(model))
        return peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("corda_method", _METHODS)
def test_mlp_matches_peft(method, corda_method):
    model, batches = TinyMLP().eval(), _mlp_batches()
    pm = _peft(model, _MLP, corda_method, lambda m: [m(x) for x in batches])
    gm = lora_fx.capture(copy.deepcopy(model), (batches[0],), method=method)
    cfg = LoraConfig(**_MLP, corda_config=CordaConfig(corda_method=corda_method))
    gm = lora_fx.initialize_corda(gm, cfg, batches)
    gm.graph.lint()
    assert_init_matches_peft(gm, pm, "corda")
    x = torch.randn(16, 10)
    with torch.no_grad():
        assert_close(gm(x), pm(x))
        assert_close(gm(x), model(x))  # residual + adapter is the original weight
        with lora_fx.disable_adapters(gm):  # non-vacuous: the adapter carries part of W
            assert_differs(gm(x), model(x))
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "record" in str(n.target)]


def test_methods_take_opposite_ends():
    """ipm's adapter takes the largest directions of W C, kpm's the smallest (PEFT's crop)."""
    model, batches = TinyMLP().eval(), _mlp_batches()
    norms = {}
    for corda_method in _METHODS:
        gm = lora_fx.capture(copy.deepcopy(model), (batches[0],))
        cfg = LoraConfig(**_MLP, corda_config=CordaConfig(corda_method=corda_method))
        lora_fx.initialize_corda(gm, cfg, batches)
        norms[corda_method] = gm.get_submodule("lin0").lora_B["default"].weight.norm()
    assert norms["ipm"] > norms["kpm"]


def _llama_batches() -> list[dict[str, torch.Tensor]]:
    # batch size 1: PEFT's hook squeezes dim 0 and fails on larger batches
    return [{"input_ids": torch.randint(0, 256, (1, 12))} for _ in range(3)]


@pytest.fixture(scope="module", params=_METHODS)
def llama(request):
    """A tiny Llama, CorDA by PEFT and by lora_fx (export), and PEFT's residual base model."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    batches = _llama_batches()
    pm = _peft(model, _LLAMA, request.param, lambda m: [m(**b) for b in batches])
    gm = lora_fx.capture(copy.deepcopy(model), (batches[0]["input_ids"],), {"use_cache": False})
    cfg = LoraConfig(**_LLAMA, corda_config=CordaConfig(corda_method=request.param))
    gm = lora_fx.initialize_corda(gm, cfg, batches)
    residual = copy.deepcopy(pm).unload()
    return model, batches, pm, gm, residual


def test_llama_matches_peft(llama):
    model, batches, pm, gm, _ = llama
    gm.graph.lint()
    assert_init_matches_peft(gm, pm, "corda")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert_close(gm(ids).logits, pm(input_ids=ids).logits)
        assert_close(gm(ids).logits, model(ids).logits)


def test_llama_files_both_ways(llama, tmp_path):
    """PEFT's CorDA adapter goes with its residual base (as PEFT's tests load it)."""
    _, _, pm, gm, residual = llama
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = gm(ids).logits
        assert_differs(expected, residual(ids).logits)  # the adapter carries part of W
    lora_fx.save_adapter(gm, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "theirs")
    # PEFT reruns `corda_init` when it loads a config saying "corda" (and fails without
    # `preprocess_corda`); its own tests set `init_lora_weights = True` before loading
    config = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    assert config.init_lora_weights == "corda"
    config.init_lora_weights = True
    loaded_by_peft = peft.PeftModel.from_pretrained(
        copy.deepcopy(residual), tmp_path / "ours", config=config
    )
    fresh = lora_fx.capture(copy.deepcopy(residual), (ids,), {"use_cache": False})
    loaded_by_us = lora_fx.load_adapter(fresh, tmp_path / "theirs")
    config = loaded_by_us.meta["lora_fx"].adapters["default"].config
    assert config.init_lora_weights == "corda"
    assert (
        config.corda_config["corda_method"] == pm.peft_config["default"].corda_config.corda_method
    )
    with torch.no_grad():
        assert_close(loaded_by_peft.eval()(input_ids=ids).logits, expected)
        assert_close(loaded_by_us(ids).logits, pm(input_ids=ids).logits)


# ------------------------------------------------------------------------------- math by hand
def test_input_covariance_by_hand():
    x = torch.tensor([[1.0, 2.0], [0.0, -4.0]])  # max 2: x / 2 = [[0.5, 1], [0, -2]]
    expected = torch.tensor([[0.25, 0.5], [0.5, 5.0]])
    assert torch.equal(input_covariance(x), expected)
    assert torch.equal(input_covariance(x[None]), expected)  # [1, s, in] as PEFT's squeeze(0)


def test_corda_by_hand():
    """Identity covariance: C' = 1.01 I, so the triplets are W's SVD; W = diag(3, 1)."""
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    new_w, a, b = corda(w, torch.eye(2), 1, 2.0, "ipm")
    assert_close(new_w, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert_close(2.0 * b @ a, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    new_w, a, b = corda(w, torch.eye(2), 1, 2.0, "kpm")
    assert_close(new_w, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(CalibrationError, match="singular"):
        corda(w, torch.zeros(2, 2), 1, 1.0, "ipm")


# ------------------------------------------------------------------------------- bad input
def _cfg(**corda_cfg) -> LoraConfig:
    return LoraConfig(**_MLP, corda_config=CordaConfig(**corda_cfg))


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        (None, "'corda' needs calibration batches"),
        ([], "batches is empty"),
        (iter(()), "batches is empty"),
        (torch.randn(16, 10), "wrap a single batch in a list"),
        ([torch.randn(16, 7)], r"batch 0 does not fit the graph's inputs \['x'\]"),
        ([torch.zeros(16, 10)], "inf or nan values"),  # x / max(x) = 0 / 0
    ],
    ids=["none", "empty", "empty-iterator", "tensor", "wrong-shape", "zeros"],
)
@pytest.mark.parametrize("method", ["fx", "export"])
def test_bad_batches_raise_and_leave_graph_unchanged(batches, match, method):
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(16, 10),), method=method)
    code, nodes = gm.code, [n.format_node() for n in gm.graph.nodes]
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(CalibrationError, match=match):
        lora_fx.initialize_corda(gm, _cfg(), batches)
    assert gm.code == code and [n.format_node() for n in gm.graph.nodes] == nodes
    assert "lora_fx" not in gm.meta
    assert gm.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())


def test_failure_after_inject_rolls_back_weights(monkeypatch):
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(16, 10),))
    code = gm.code
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    import lora_fx.passes._calibrate as pass_module

    calls = []

    def failing(gm, site, *args):
        calls.append(site.fqn)
        if len(calls) == 2:  # the first site's weight is already rewritten
            raise RuntimeError("boom")
        return write(gm, site, *args)

    write = pass_module.write_init
    monkeypatch.setattr(pass_module, "write_init", failing)
    with pytest.raises(RuntimeError, match="boom"):
        lora_fx.initialize_corda(gm, _cfg(), _mlp_batches())
    assert gm.code == code and "lora_fx" not in gm.meta
    assert all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())


def test_config_errors():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(16, 10),))
    batches = _mlp_batches()
    with pytest.raises(ConfigError, match=r"call lora_fx.initialize_corda\(gm, cfg, batches\)"):
        lora_fx.inject(gm, _cfg())
    with pytest.raises(ConfigError, match="initialize_corda needs init_lora_weights='corda'"):
        lora_fx.initialize_corda(gm, LoraConfig(target_modules=["lin0"]), batches)
    with pytest.raises(ConfigError, match="corda_method='svd' is invalid"):
        _cfg(corda_method="svd")
    with pytest.raises(ConfigError, match="cache_file='c.pt' is not supported"):
        lora_fx.initialize_corda(gm, _cfg(cache_file="c.pt"), batches)
    with pytest.raises(UnsupportedSiteError, match="'lin1'.*r=3"):
        lora_fx.initialize_corda(gm, LoraConfig(**{**_MLP, "r": 3}, corda_config={}), batches)
    conv = lora_fx.capture(TinyConv().eval(), (torch.randn(2, 3, 6, 6),))
    with pytest.raises(UnsupportedSiteError, match="'corda' is not supported on"):
        lora_fx.initialize_corda(
            conv,
            LoraConfig(target_modules=["conv0"], init_lora_weights="corda", corda_config={}),
            [torch.randn(2, 3, 6, 6)],
        )
    assert "lora_fx" not in gm.meta


def test_corda_config_round_trips_and_defaults():
    with pytest.warns(UserWarning, match="without corda_config"):
        cfg = LoraConfig(init_lora_weights="corda")
    assert cfg.corda_config == CordaConfig().__dict__
    assert LoraConfig.from_dict(cfg.to_dict()).corda_config == cfg.corda_config
    with pytest.warns(UserWarning, match="corda_config is ignored"):
        LoraConfig(corda_config=CordaConfig())
