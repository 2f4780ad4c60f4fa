"""MonteCLoRA (PEFT 0.21.2's `monteclora_config`) against PEFT itself.

PEFT's sampler draws from torch's global RNG (at init, then one buffer of draws at a time), and
lora_fx's draws the same numbers in the same order, so with the same seed both sides see the same
samples: training outputs, the variational loss and every gradient are compared directly. Eval
is plain LoRA (deterministic), merges fold plain LoRA's delta, and files go both ways.
"""

from __future__ import annotations

import copy

import peft
import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import (
    assert_hotswap_refused,
    assert_mixed_batch_rows,
    assert_no_lora,
    lm_pair,
    lora_roles,
)
from models import TinyMLP, tiny_llama

import lora_fx
from lora_fx import AdapterError, ConfigError, LoraConfig, MontecloraConfig, UnsupportedSiteError
from lora_fx.math.monteclora import perturbed_a, wishart_covariance

_FEATURES = (16, 24, 12)
# buffer_size 2: the third training forward refills the buffer from the global RNG
_MONTE = {"num_samples": 3, "buffer_size": 2, "use_entropy": True, "sample_scaler": 0.05}
_CFG = {
    "target_modules": ["lin0", "lin1"],
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "init_lora_weights": False,
    "monteclora_config": _MONTE,
}
_PREFIX = "base_model.model."


def _pair(method: str = "export"):
    """PEFT and lora_fx on the same MLP weights and the same seed (A, B random)."""
    torch.manual_seed(0)
    model, x = TinyMLP(features=_FEATURES).eval(), torch.randn(3, 5, _FEATURES[0])
    model.drop.p = 0.0  # only the branch's dropout draws from the RNG (the same on both sides)
    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**_CFG)).eval()
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**_CFG))
    return model, x, gm, pm


def _train_step(module, x, seed, loss_fn):
    """One seeded training forward and backward; returns (output, loss, lora grads)."""
    module.zero_grad()
    torch.manual_seed(seed)
    out = module(x)
    loss = loss_fn()
    (out.sum() + loss).backward()
    grads = {
        n.removeprefix(_PREFIX).removeprefix("_orig_mod."): p.grad.clone()
        for n, p in module.named_parameters()
        if ".lora_" in n and p.grad is not None
    }
    return out.detach(), loss.detach(), grads


def test_math_by_hand():
    a = torch.tensor([[1.0, 2.0]])  # [r=1, in=2]
    noise = torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]])  # [n=2, in=2, r=1]
    # A^T + noise_k: [[2], [2]] and [[1], [4]]; their mean [[1.5], [3]]
    assert torch.equal(
        perturbed_a(a, (noise, torch.tensor([0.5, 0.5]))), torch.tensor([[1.5, 3.0]])
    )
    assert perturbed_a(a, None) is a  # eval: A itself
    nan = torch.full_like(noise, float("nan"))
    assert torch.equal(perturbed_a(a, (nan, torch.tensor([0.5, 0.5]))), a)  # PEFT: keep A
    # D = diag(e^0, e^1); D Z D^T keeps Z's diagonal times (1, e^2), clipped below at 1e-3
    z = torch.tensor([[2.0, 5.0], [5.0, -1.0]])
    cov = wishart_covariance(torch.tensor([0.0, 1.0]), z)
    assert torch.equal(cov, torch.diag(torch.tensor([2.0, 1e-3])))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_init_train_eval_loss_gradients_match_peft(method):
    model, x, gm, pm = _pair(method)
    theirs = pm.state_dict()
    ours = {k: v for k, v in gm.state_dict().items() if ".lora_" in k}
    assert len(ours) == 12  # A, B and the sampler's 2 parameters + 2 buffers, on 2 sites
    for name, value in ours.items():  # PEFT's RNG stream: the same tensors, bit for bit
        assert torch.equal(value, theirs[_PREFIX + name]), name
    assert sorted(n for n, p in gm.named_parameters() if p.requires_grad) == sorted(
        n.removeprefix(_PREFIX) for n, p in pm.named_parameters() if p.requires_grad
    )
    gm.graph.lint()
    assert sum(n.target is perturbed_a for n in gm.graph.nodes) == 2
    assert lora_roles(gm)["lora_a"] == 4  # the sampler call and the perturbed A, per site
    with torch.no_grad():  # eval: plain LoRA, deterministic
        expected = pm(x)
        assert_differs(expected, model(x))
        assert_close(gm(x), expected)
        assert torch.equal(gm(x), gm(x))
    assert lora_fx.get_monteclora_loss(gm) == pm._get_monteclora_loss() == 0.0
    gm.train(), pm.train()
    assert_close(lora_fx.get_monteclora_loss(gm), pm._get_monteclora_loss())  # the init buffers
    for step in range(3):
        out, loss, grads = _train_step(gm, x, step, lambda: lora_fx.get_monteclora_loss(gm))
        p_out, p_loss, p_grads = _train_step(pm, x, step, pm._get_monteclora_loss)
        assert_close(out, p_out)
        assert_close(loss, p_loss)
        assert grads.keys() == p_grads.keys() and len(grads) == 8
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name
            assert_close(grad, p_grads[name])
    theirs = pm.state_dict()
    for name, value in gm.state_dict().items():  # the sampler's buffers: the last forward's
        if "lora_monteclora_sampler" in name:
            assert_close(value, theirs[_PREFIX + name])
    sampled = gm(x).detach()
    with torch.no_grad():
        assert_differs(sampled, gm.eval()(x), min_diff=1e-4)  # the samples change the output


def test_merge_is_plain_lora_as_in_peft():
    model, x, gm, pm = _pair()
    with torch.no_grad():
        expected = pm(x)
        lora_fx.merge(gm)
        assert_close(gm(x), expected)
        assert_close(gm.lin0.weight, copy.deepcopy(pm).merge_and_unload().lin0.weight)
        lora_fx.unmerge(gm)
        assert_close(gm.lin0.weight, model.lin0.weight)
        merged = lora_fx.merge_and_unload(gm)
    assert_no_lora(merged)
    with torch.no_grad():
        assert_close(merged(x), expected)


def test_files_both_ways(tmp_path):
    model, x, gm, pm = _pair()
    gm.train(), pm.train()
    for module in (gm, pm):  # the buffers now hold a forward's covariance and weights
        torch.manual_seed(3)
        module(x)
    gm.eval(), pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    lora_fx.save_adapter(gm, tmp_path / "ours")
    ours = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and len(ours) == 12
    assert ours[f"{_PREFIX}lin1.lora_monteclora_sampler.gaussian_var_prior"].shape == (4, 4)
    for key, value in ours.items():
        assert_close(value, theirs[key])
    cfg = LoraConfig.from_json(tmp_path / "peft" / "adapter_config.json")
    assert cfg.monteclora_config == {**MontecloraConfig().__dict__, **_MONTE}
    with torch.no_grad():
        expected = pm(x)
    fresh = lora_fx.load_adapter(lora_fx.capture(copy.deepcopy(model), (x,)), tmp_path / "peft")
    loaded = fresh.state_dict()
    for key, value in theirs.items():
        path = key.removeprefix(_PREFIX).replace(".weight", ".default.weight")
        assert torch.equal(loaded[path.replace("sampler.", "sampler.default.")], value), key
    with torch.no_grad():
        assert_close(fresh(x), expected)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    for key, value in back.state_dict().items():
        if "lora_monteclora_sampler" in key:
            assert torch.equal(value, ours[key.replace(".default", "")]), key


def test_llama_export_matches_peft():
    torch.manual_seed(0)
    model, ids = tiny_llama(layers=2, hidden=64).eval(), torch.randint(0, 256, (2, 12))
    cfg = {**_CFG, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    gm, pm, _ = lm_pair(model, ids, cfg, lambda m: peft.get_peft_model(m, peft.LoraConfig(**cfg)))
    gm.train(), pm.train()
    for step in range(3):
        gm.zero_grad(), pm.zero_grad()
        torch.manual_seed(step)
        ours = gm(ids).logits
        torch.manual_seed(step)
        theirs = pm(ids, use_cache=False).logits
        assert_close(ours, theirs)
        loss = lora_fx.get_monteclora_loss(gm)
        assert_close(loss, pm._get_monteclora_loss())
        (ours.square().mean() + loss).backward()
        (theirs.square().mean() + pm._get_monteclora_loss()).backward()
    peft_params = dict(pm.named_parameters())
    for name, param in gm.named_parameters():
        if ".lora_" in name:
            assert_close(param.grad, peft_params[_PREFIX + name].grad)


# dynamo reads the sampler's buffers, which hold tensors with autograd history (PEFT's design)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("method", ["fx", "export"])
def test_compiled_matches_eager(method):
    _, x, gm, _ = _pair(method)
    with torch.no_grad():
        eager = gm(x)
        assert_close(torch.compile(gm, backend="aot_eager", fullgraph=True)(x), eager)
    # Training: the draw is a graph break (the sampler's buffer lives in Python, as PEFT's)
    compiled = torch.compile(gm, backend="aot_eager")
    gm.train()
    twin = copy.deepcopy(gm)  # the same parameters and the same sampler state
    for step in range(3):
        eager_out, eager_loss, eager_grads = _train_step(
            twin, x, step, lambda: lora_fx.get_monteclora_loss(twin)
        )
        out, loss, grads = _train_step(compiled, x, step, lambda: lora_fx.get_monteclora_loss(gm))
        assert_close(out, eager_out)
        assert_close(loss, eager_loss)
        assert grads.keys() == eager_grads.keys() and len(grads) == 8
        for name, grad in grads.items():
            assert_close(grad, eager_grads[name])


@pytest.mark.parametrize(
    ("monte", "match"),
    [
        ({"num_samples": 0}, "num_samples=0"),
        ({"num_samples": 2.0}, "num_samples=2.0"),
        ({"buffer_size": 0}, "buffer_size=0"),
        ({"dirichlet_prior": 0}, "dirichlet_prior=0"),
        ({"sample_scaler": "big"}, "sample_scaler='big'"),
        ({"use_entropy": 1}, "use_entropy=1"),
        ("yes", "monteclora_config='yes'"),
    ],
)
def test_bad_monteclora_config_names_the_field(monte, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(target_modules=["lin0"], monteclora_config=monte)


def test_monteclora_config_dataclass_and_variants():
    cfg = LoraConfig(target_modules=["lin0"], monteclora_config=MontecloraConfig(num_samples=2))
    assert cfg.monteclora_config["num_samples"] == 2 and cfg.monteclora_config["buffer_size"] == 150
    for other in ({"use_dora": True}, {"use_qalora": True}, {"velora_config": {}}):
        with pytest.raises(ConfigError, match="monteclora_config is not supported with"):
            LoraConfig(target_modules=["lin0"], monteclora_config={}, **other)


def test_refused_sites_and_operations_leave_the_graph_unchanged(tmp_path):
    torch.manual_seed(0)
    model, x = TinyMLP(features=(64, 64, 32)).eval(), torch.randn(4, 64)
    gm = lora_fx.quantize(lora_fx.capture(model, (x,)), "nf4")
    code, state = gm.code, repr(gm.meta.get("lora_fx"))
    with pytest.raises(UnsupportedSiteError, match="monteclora_config is not supported on site"):
        lora_fx.inject(gm, LoraConfig(**_CFG))
    assert gm.code == code and repr(gm.meta.get("lora_fx")) == state
    assert not [k for k in gm.state_dict() if ".lora_" in k]
    _, x, gm, _ = _pair()
    with pytest.raises(ValueError, match="MonteCLoRA"):
        lora_fx.add_weighted_adapter(gm, ["default"], [1.0], "mix")
    with pytest.raises(AdapterError, match="unknown adapter"):
        lora_fx.get_monteclora_loss(gm, "other")
    plain = LoraConfig(target_modules=["lin0"])
    lora_fx.inject(gm, plain, "plain")
    lora_fx.set_adapter(gm, "plain")
    assert lora_fx.get_monteclora_loss(gm.train()) == 0.0  # no MonteCLoRA sampler counts
    lora_fx.delete_adapter(gm, "default")
    assert not hasattr(gm.lin0, "lora_monteclora_sampler")


@pytest.mark.parametrize("merged", [True, False])
def test_onnx_export_is_eval_lora(merged, tmp_path):
    import onnxruntime

    from lora_fx.exporters import export_onnx

    _, x, gm, pm = _pair()
    export_onnx(gm, (x,), tmp_path / "m.onnx", merged=merged)
    session = onnxruntime.InferenceSession(tmp_path / "m.onnx")
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(y), pm(x))


def test_checkpoint_blocks_is_refused():
    torch.manual_seed(0)
    model, ids = tiny_llama(layers=2, hidden=64).eval(), torch.randint(0, 256, (1, 8))
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    lora_fx.inject(gm, LoraConfig(**{**_CFG, "target_modules": ["q_proj"]}))
    code = gm.code
    with pytest.raises(ValueError, match=r"adapters \['default'\] use monteclora_config"):
        lora_fx.checkpoint_blocks(gm)
    assert gm.code == code and not lora_fx.checkpointed_blocks(gm)


def test_hotswap_is_refused(tmp_path):
    assert_hotswap_refused(_pair()[2], tmp_path, "MonteCLoRA")


def test_mixed_batch_rows_take_their_adapter():
    _, x, gm, _ = _pair()
    assert_mixed_batch_rows(gm, x)
