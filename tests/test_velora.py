"""VeLoRA (PEFT 0.21.2's `velora_config`) against PEFT itself on a custom MLP.

Forward outputs are plain LoRA's; after one training backward A's and B's gradients and the
projection buffer `lora_velora_embed` must be PEFT's numbers. Files go both ways, merge is
LoRA's, and bad `velora_config` values are refused by field name.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close
from torch import nn

import lora_fx
from lora_fx import ConfigError, LoraConfig, VeloraConfig

_TARGETS = ["up", "down"]


class _Mlp(nn.Module):
    """up (10 -> 14) -> gelu -> down (14 -> 6): in-features that do not divide the groups."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(10, 14)
        self.down = nn.Linear(14, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


def _pair(method: str, init_type: str = "batch_average"):
    """PEFT and lora_fx on the same weights and seed, with the same non-zero B."""
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(2, 5, 10)
    cfg = {"target_modules": _TARGETS, "r": 3, "lora_alpha": 6}
    cfg["velora_config"] = {"num_groups": 4, "scale": 0.5, "init_type": init_type}
    gm = lora_fx.capture(copy.deepcopy(model), (x,), method=method)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**cfg))
    for site in _TARGETS:
        ours, theirs = gm.get_submodule(site), pm.base_model.model.get_submodule(site)
        b = torch.randn_like(ours.lora_B["default"].weight)
        with torch.no_grad():
            ours.lora_B["default"].weight.copy_(b)
            theirs.lora_B["default"].weight.copy_(b)
            torch.testing.assert_close(
                ours.lora_A["default"].weight, theirs.lora_A["default"].weight
            )
            torch.testing.assert_close(
                ours.lora_velora_embed["default"], theirs.lora_velora_embed["default"]
            )
    return pm, gm, x


@pytest.mark.parametrize("method", ["export", "fx"])
@pytest.mark.parametrize("init_type", ["batch_average", "batch_average_once", "random"])
def test_training_step_matches_peft(method, init_type):
    pm, gm, x = _pair(method, init_type)
    with torch.no_grad():  # eval forward: plain LoRA, the buffer untouched
        assert_close(gm.eval()(x), pm.eval()(x))
    pm.train(), gm.train()
    for _ in range(2):  # "once" must keep the first batch's projection
        ours, theirs = gm(x), pm(x)
        assert_close(ours, theirs)
        ours.square().sum().backward()
        theirs.square().sum().backward()
        x = x * 2 + 1
    for site in _TARGETS:
        mine, peft_site = gm.get_submodule(site), pm.base_model.model.get_submodule(site)
        embed = mine.lora_velora_embed["default"]
        assert not embed.requires_grad and "lora_velora_embed.default" in dict(mine.named_buffers())
        assert_close(embed, peft_site.lora_velora_embed["default"])
        for holder in ("lora_A", "lora_B"):
            grad = getattr(mine, holder)["default"].weight.grad
            assert grad is not None
            assert_close(grad, getattr(peft_site, holder)["default"].weight.grad)
    assert sorted(n for n, p in gm.named_parameters() if p.requires_grad) == sorted(
        n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad
    )


def test_gradient_is_the_approximation():
    """A's gradient differs from the exact one (it is VeLoRA's), B's does not."""
    _, gm, x = _pair("export")
    gm.train()
    gm(x).square().sum().backward()
    approx = gm.up.lora_A["default"].weight.grad.clone()
    gm.zero_grad()
    gm.eval()
    gm(x).square().sum().backward()  # eval with grad: PEFT's plain lora_A, an exact gradient
    assert not torch.allclose(approx, gm.up.lora_A["default"].weight.grad)


def test_files_both_ways_and_merge(tmp_path):
    pm, gm, x = _pair("export", "random")
    pm.train(), gm.train()
    gm(x), pm(x)
    pm.save_pretrained(tmp_path / "peft")
    lora_fx.save_adapter(gm, tmp_path / "ours")
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.up.lora_velora_embed" in ours
    for key in ours:
        assert_close(ours[key], theirs[key])
    # PEFT -> lora_fx: the buffer comes back as a buffer, frozen
    fresh = lora_fx.capture(_Mlp().eval(), (x,))
    with torch.no_grad():
        fresh.load_state_dict(
            {k: v for k, v in gm.state_dict().items() if "lora" not in k}, strict=False
        )
    loaded = lora_fx.load_adapter(fresh, tmp_path / "peft")
    assert_close(
        loaded.up.lora_velora_embed["default"], theirs["base_model.model.up.lora_velora_embed"]
    )
    assert not loaded.up.lora_velora_embed["default"].requires_grad
    with torch.no_grad():
        assert_close(loaded.eval()(x), pm.eval()(x))
    # lora_fx -> PEFT
    back = peft.PeftModel.from_pretrained(_Mlp(), tmp_path / "ours")
    embed = back.base_model.model.up.lora_velora_embed["default"]
    assert_close(embed, gm.up.lora_velora_embed["default"])
    # merge: plain LoRA's fold
    with torch.no_grad():
        expected = pm.eval()(x)
        lora_fx.merge(gm.eval())
        assert_close(gm(x), expected)
        assert_close(gm.up.weight, pm.merge_and_unload().up.weight)


@pytest.mark.parametrize(
    ("velora", "field"),
    [
        ({"num_groups": 0}, "num_groups"),
        ({"num_groups": 2.5}, "num_groups"),
        ({"scale": 0}, "scale"),
        ({"scale": "1"}, "scale"),
        ({"init_type": "mean"}, "init_type"),
        ("yes", "velora_config"),
    ],
)
def test_bad_velora_config_names_the_field(velora, field):
    with pytest.raises(ConfigError, match=field):
        LoraConfig(target_modules=_TARGETS, velora_config=velora)


def test_velora_config_dataclass_and_variants():
    cfg = LoraConfig(target_modules=_TARGETS, velora_config=VeloraConfig(num_groups=2))
    assert cfg.velora_config == {"num_groups": 2, "scale": 1.0, "init_type": "batch_average"}
    with pytest.raises(ConfigError, match="use_dora"):
        LoraConfig(target_modules=_TARGETS, velora_config={}, use_dora=True)
