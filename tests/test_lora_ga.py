"""LoRA-GA (`initialize_lora_ga`, PEFT's `init_lora_weights="lora_ga"`) against PEFT 0.21.2.

PEFT's `preprocess_loraga` + `get_peft_model` is the oracle: A, B and the residual base weight
match to float32 rounding, and outputs after init, on a custom MLP (both capture methods) and a
tiny Llama (export, batches with labels). Files go both ways, on PEFT's residual base.
`torch.svd_lowrank` is randomized: both sides run it under the same per-call seed.
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
from peft.tuners.lora.config import LoraGAConfig as PeftLoraGAConfig
from peft.tuners.lora.loraga import preprocess_loraga

import lora_fx
from lora_fx import CalibrationError, ConfigError, LoraConfig, LoraGAConfig, UnsupportedSiteError
from lora_fx.math.lora_ga import lora_ga

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
# lin1 is 20 -> 2: LoRA-GA takes 2r directions, so r = 1
_MLP = {"r": 1, "lora_alpha": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": "lora_ga"}
_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LLAMA = {"r": 4, "lora_alpha": 8, "target_modules": _LINEARS, "init_lora_weights": "lora_ga"}
_OPTIONS = [("ArB2r", "stable"), ("A2rBr", "weight_svd"), ("ArBr", "gd_scale"), ("ArB2r", "unit")]


@pytest.fixture(autouse=True)
def _seeded_svd(monkeypatch):
    """Every `torch.svd_lowrank` call draws from the same seed, in PEFT and in lora_fx."""
    svd_lowrank = torch.svd_lowrank

    def seeded(*args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)


def _mlp() -> TinyMLP:
    model = TinyMLP().eval()
    model.drop.p = 0.0  # both run in train mode (as PEFT): no random dropout to compare
    return model


def _mlp_loss(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return -output[:, 0].mean()  # NLL of class 0 (the model ends in log_softmax)


def _mlp_batches() -> list[torch.Tensor]:
    return [torch.randn(16, 10) for _ in range(3)]


def _peft(model, cfg: dict, options: tuple[str, str], step):
    """PEFT's LoRA-GA on a copy of `model`: gradients from `step(model)`, then the adapter."""
    direction, scale = options
    config = peft.LoraConfig(
        **cfg, lora_ga_config=PeftLoraGAConfig(direction=direction, scale=scale)
    )
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_loraga(model, config, train_step=lambda: step(model))
        return peft.get_peft_model(model, config).eval()


def _cfg(base: dict, options: tuple[str, str] = _OPTIONS[0], **kw) -> LoraConfig:
    direction, scale = options
    ga = LoraGAConfig(direction=direction, scale=scale)
    return LoraConfig(**{**base, **kw}, lora_ga_config=ga)


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("options", _OPTIONS, ids=["-".join(o) for o in _OPTIONS])
def test_mlp_matches_peft(method, options):
    model, batches = _mlp(), _mlp_batches()
    pm = _peft(model, _MLP, options, lambda m: [_mlp_loss(m(x), x).backward() for x in batches])
    gm = lora_fx.capture(copy.deepcopy(model), (batches[0],), method=method)
    gm = lora_fx.initialize_lora_ga(gm, _cfg(_MLP, options), batches, _mlp_loss)
    gm.graph.lint()
    assert_init_matches_peft(gm, pm, "lora_ga")
    assert not gm.training  # the training flag is restored
    assert all(p.grad is None for p in gm.parameters())  # no gradients left behind
    assert [k for k, p in gm.named_parameters() if p.requires_grad] == [
        "lin0.lora_A.default.weight",
        "lin0.lora_B.default.weight",
        "lin1.lora_A.default.weight",
        "lin1.lora_B.default.weight",
    ]  # as after inject
    x = torch.randn(16, 10)
    with torch.no_grad():
        assert_close(gm(x), pm(x))
        assert_close(gm(x), model(x))  # residual + adapter is the original weight
        with lora_fx.disable_adapters(gm):  # non-vacuous: the adapter carries part of W
            assert_differs(gm(x), model(x))


def test_random_direction_keeps_the_weight():
    model, batches = _mlp(), _mlp_batches()
    gm = lora_fx.capture(copy.deepcopy(model), (batches[0],))
    lora_fx.initialize_lora_ga(gm, _cfg(_MLP, ("random", "stable")), batches, _mlp_loss)
    x = torch.randn(16, 10)
    with torch.no_grad():
        assert_close(gm(x), model(x))


def _llama_batches() -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(2):
        ids = torch.randint(0, 256, (2, 12))
        out.append({"input_ids": ids, "labels": ids})
    return out


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama, LoRA-GA by PEFT and by lora_fx (export, default loss), PEFT's residual."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    batches = _llama_batches()
    with pytest.MonkeyPatch.context() as mp:
        _seeded_svd.__wrapped__(mp)
        pm = _peft(model, _LLAMA, _OPTIONS[0], lambda m: [m(**b).loss.backward() for b in batches])
        ids = batches[0]["input_ids"]
        gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"labels": ids, "use_cache": False})
        gm = lora_fx.initialize_lora_ga(gm, _cfg(_LLAMA), batches)
    residual = copy.deepcopy(pm).unload()
    return model, batches, pm, gm, residual


def test_llama_matches_peft(llama):
    model, _, pm, gm, _ = llama
    gm.graph.lint()
    assert_init_matches_peft(gm, pm, "lora_ga")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert_close(gm(ids, labels=ids).logits, pm(input_ids=ids).logits)
        assert_close(gm(ids, labels=ids).logits, model(ids).logits)


def test_llama_files_both_ways(llama, tmp_path):
    """PEFT's LoRA-GA adapter goes with its residual base (PEFT falls back to a plain init)."""
    _, _, pm, gm, residual = llama
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = gm(ids, labels=ids).logits
        assert_differs(expected, residual(ids).logits)  # the adapter carries part of W
    lora_fx.save_adapter(gm, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "theirs")
    config = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    assert config.init_lora_weights == "lora_ga"
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "ours")
    fresh = lora_fx.capture(copy.deepcopy(residual), (ids,), {"labels": ids, "use_cache": False})
    loaded_by_us = lora_fx.load_adapter(fresh, tmp_path / "theirs")
    config = loaded_by_us.meta["lora_fx"].adapters["default"].config
    assert config.init_lora_weights == "lora_ga"
    assert config.lora_ga_config == LoraGAConfig().__dict__
    with torch.no_grad():
        assert_close(loaded_by_peft.eval()(input_ids=ids).logits, expected)
        assert_close(loaded_by_us(ids, labels=ids).logits, pm(input_ids=ids).logits)


# ------------------------------------------------------------------------------- math by hand
def test_lora_ga_by_hand():
    """G = diag(4, 3, 2, 1): ArB2r gives A = e1 (up to sign), B = 3 e2 (stable, gamma 16)."""
    grad = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    w = torch.eye(4)
    new_w, a, b = lora_ga(grad, w, 1, 2.0, scaling="stable", stable_gamma=16)
    delta = torch.zeros(4, 4)
    delta[1, 0] = 3.0 * 4**0.25 / 4  # B @ A = 3 (out^0.25 / sqrt(16)) e2 e1^T, up to sign
    assert_close((b @ a).abs(), delta)
    assert_close(new_w + 2.0 * b @ a, w)
    _, a, b = lora_ga(grad, w, 1, 2.0, direction="A2rBr", scaling="unit")
    assert_close(
        (b @ a).abs(),
        torch.zeros(4, 4).index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(4.0)),
    )


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("batches", "loss_fn", "match"),
    [
        (None, _mlp_loss, "'lora_ga' needs calibration batches"),
        ([], _mlp_loss, "batches is empty"),
        ([torch.randn(16, 10)], None, r"batch 0 has no 'labels'.*pass loss_fn"),
        ([torch.randn(16, 7)], _mlp_loss, r"batch 0 does not fit the graph's inputs \['x'\]"),
        ([torch.randn(16, 10)], lambda out, x: out, "must be a scalar tensor"),
        ([torch.randn(16, 10)], lambda out, x: out[:, 0].mean().detach() * 0, "scalar tensor"),
    ],
    ids=["none", "empty", "no-loss", "wrong-shape", "not-scalar", "no-grad"],
)
@pytest.mark.parametrize("method", ["fx", "export"])
def test_bad_input_raises_and_leaves_graph_unchanged(batches, loss_fn, match, method):
    gm = lora_fx.capture(_mlp(), (torch.randn(16, 10),), method=method)
    gm.get_parameter("lin1.bias").requires_grad_(False)
    code, nodes = gm.code, [n.format_node() for n in gm.graph.nodes]
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    flags = {k: p.requires_grad for k, p in gm.named_parameters()}
    with pytest.raises(CalibrationError, match=match):
        lora_fx.initialize_lora_ga(gm, _cfg(_MLP), batches, loss_fn)
    assert gm.code == code and [n.format_node() for n in gm.graph.nodes] == nodes
    assert "lora_fx" not in gm.meta and not gm.training
    assert all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())
    assert {k: p.requires_grad for k, p in gm.named_parameters()} == flags
    assert all(p.grad is None for p in gm.parameters())


def test_labels_the_graph_does_not_take():
    gm = lora_fx.capture(tiny_llama().eval(), (torch.randint(0, 256, (1, 8)),))
    with pytest.raises(CalibrationError, match="capture the model with labels"):
        lora_fx.initialize_lora_ga(gm, _cfg(_LLAMA), _llama_batches())


def test_site_the_loss_does_not_reach():
    gm = lora_fx.capture(_mlp(), (torch.randn(16, 10),))
    with pytest.raises(CalibrationError, match="'lin1'.*no gradient"):
        lora_fx.initialize_lora_ga(
            gm, _cfg(_MLP), _mlp_batches(), lambda out, x: gm.get_parameter("lin0.weight").sum()
        )
    assert "lora_fx" not in gm.meta


def test_failure_after_inject_rolls_back_weights(monkeypatch):
    gm = lora_fx.capture(_mlp(), (torch.randn(16, 10),))
    code = gm.code
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    import lora_fx.passes._calibrate as pass_module

    calls = []
    write = pass_module.write_init

    def failing(gm, site, *args):
        calls.append(site.fqn)
        if len(calls) == 2:  # the first site's weight is already rewritten
            raise RuntimeError("boom")
        return write(gm, site, *args)

    monkeypatch.setattr(pass_module, "write_init", failing)
    with pytest.raises(RuntimeError, match="boom"):
        lora_fx.initialize_lora_ga(gm, _cfg(_MLP), _mlp_batches(), _mlp_loss)
    assert gm.code == code and "lora_fx" not in gm.meta
    assert all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())


def test_config_errors():
    gm = lora_fx.capture(_mlp(), (torch.randn(16, 10),))
    batches = _mlp_batches()
    with pytest.raises(ConfigError, match=r"call lora_fx.initialize_lora_ga\(gm, cfg, batches"):
        lora_fx.inject(gm, _cfg(_MLP))
    with pytest.raises(ConfigError, match="initialize_lora_ga needs init_lora_weights='lora_ga'"):
        lora_fx.initialize_lora_ga(gm, LoraConfig(target_modules=["lin0"]), batches, _mlp_loss)
    with pytest.raises(ConfigError, match="direction='BA' is invalid"):
        _cfg(_MLP, ("BA", "stable"))
    with pytest.raises(UnsupportedSiteError, match="'lin1'.*r=2"):
        lora_fx.initialize_lora_ga(gm, _cfg(_MLP, r=2), batches, _mlp_loss)
    conv = lora_fx.capture(TinyConv().eval(), (torch.randn(2, 3, 6, 6),))
    with pytest.raises(UnsupportedSiteError, match="'lora_ga' is not supported on"):
        lora_fx.initialize_lora_ga(
            conv,
            LoraConfig(target_modules=["conv0"], init_lora_weights="lora_ga", lora_ga_config={}),
            [torch.randn(2, 3, 6, 6)],
            lambda out, x: out.sum(),
        )
    assert "lora_fx" not in gm.meta


def test_lora_ga_config_round_trips_and_defaults():
    with pytest.warns(UserWarning, match="without lora_ga_config"):
        cfg = LoraConfig(init_lora_weights="lora_ga")
    assert cfg.lora_ga_config == LoraGAConfig().__dict__
    assert LoraConfig.from_dict(cfg.to_dict()).lora_ga_config == cfg.lora_ga_config
    with pytest.warns(UserWarning, match="lora_ga_config is ignored"):
        LoraConfig(lora_ga_config=LoraGAConfig())
