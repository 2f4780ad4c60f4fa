import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import capture_case, lora_adds, lora_roles
from models import METHODS, SITE_CASES, TinyBlockStack, TinyMLP

import lora_fx
from lora_fx import AdapterError, LoraConfig, UnsupportedSiteError


def n_sites(targets):
    return len(targets)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(SITE_CASES))
def test_fresh_inject_equals_base_and_tags_every_node(case, method):
    gm, x, targets = capture_case(case, method)
    base = gm(x)
    lora_fx.inject(gm, LoraConfig(target_modules=targets, lora_dropout=0.1))
    gm.graph.lint()
    assert_close(gm(x), base)  # B (or embedding A) starts at zero
    fused = lora_roles(gm)  # linear / embedding: one node for B, scale and add; conv: plain
    assert fused["add"] == n_sites(targets) and fused["scale"] == (2 if case == "conv" else 0)
    lora_fx.set_layout(gm, "plain")
    roles = lora_roles(gm)
    n = len(targets)
    n_emb = 1 if case == "embedding" else 0
    assert roles["add"] == roles["scale"] == roles["lora_b"] == n
    assert roles["dropout"] == n - n_emb  # PEFT puts no dropout on embeddings
    assert roles["lora_a"] == n + n_emb  # embedding: transpose + lookup
    assert roles["weight"] == 2 * n


@pytest.mark.parametrize("method", METHODS)
def test_parameters_named_as_peft_and_only_adapter_trains(method):
    model = TinyMLP().eval()
    gm = lora_fx.capture(model, (torch.randn(2, 10),), method=method)
    lora_fx.inject(gm, LoraConfig(r=4, target_modules=["lin0"]))
    trainable = lora_fx.trainable_parameters(gm)
    assert set(trainable) == {"lin0.lora_A.default.weight", "lin0.lora_B.default.weight"}
    assert trainable["lin0.lora_A.default.weight"].shape == (4, 10)
    assert trainable["lin0.lora_B.default.weight"].shape == (20, 4)
    assert not model.lin1.weight.requires_grad


def test_bias_modes_mark_biases_trainable():
    model = TinyMLP().eval()
    gm = lora_fx.capture(model, (torch.randn(2, 10),))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], bias="lora_only"))
    assert {n for n in lora_fx.trainable_parameters(gm) if n.endswith("bias")} == {"lin0.bias"}
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], bias="all"))
    assert {n for n in lora_fx.trainable_parameters(gm) if n.endswith("bias")} == {
        "lin0.bias",
        "lin1.bias",
    }


def test_lora_dropout_follows_train_and_eval():
    model = TinyMLP().eval()
    model.drop.p = 0.0
    x = torch.randn(32, 10)
    gm = lora_fx.capture(model, (x,))
    lora_fx.inject(
        gm, LoraConfig(target_modules=["lin0"], lora_dropout=0.5, init_lora_weights=False)
    )
    gm.eval()
    assert torch.equal(gm(x), gm(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x)), "LoRA dropout should be live in train mode"


def test_gradients_reach_only_lora_and_change_output():
    model = TinyBlockStack().eval()
    ids = torch.randint(0, 50, (2, 5))
    gm = lora_fx.capture(model, (ids,))
    base = gm(ids).detach()
    lora_fx.inject(gm, LoraConfig(target_modules=["attn", "mlp"]))
    opt = torch.optim.SGD(lora_fx.trainable_parameters(gm).values(), lr=0.5)
    gm(ids).square().mean().backward()
    assert all(p.grad is None for n, p in gm.named_parameters() if ".lora_" not in n)
    assert all(p.grad is not None for p in lora_fx.trainable_parameters(gm).values())
    opt.step()
    assert_differs(gm(ids), base)


def test_modules_to_save_copy_trains_and_original_stays():
    model = TinyMLP().eval()
    x = torch.randn(4, 10)
    gm = lora_fx.capture(model, (x,))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    assert "lin1.modules_to_save.default.weight" in lora_fx.trainable_parameters(gm)
    with torch.no_grad():
        gm.lin1.modules_to_save.default.weight.add_(torch.randn(2, 20))
    assert_differs(gm(x), model(x))
    assert not model.lin1.weight.requires_grad


def test_second_adapter_is_added_inactive_and_frozen_as_peft():
    model = TinyMLP().eval()
    x = torch.randn(4, 10)
    gm = lora_fx.capture(model, (x,))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False), "a")
    only_a = gm(x).detach()
    lora_fx.inject(
        gm, LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False), "b"
    )
    assert lora_adds(gm, "a") == 1 and not lora_roles(gm, "b")
    assert lora_fx.active_adapters(gm) == ["a"]
    assert not gm.lin1.lora_A.b.weight.requires_grad
    assert_close(gm(x), only_a)


@pytest.mark.parametrize(
    ("cfg", "name", "err", "match"),
    [
        (
            LoraConfig(target_modules=["lin0"]),
            "default",
            AdapterError,
            r"adapter 'default' already exists",
        ),
        (
            LoraConfig(target_modules=["lin0"]),
            "bad name",
            AdapterError,
            r"adapter_name='bad name' is invalid",
        ),
        (
            LoraConfig(target_modules=["lin0"], r=3, init_lora_weights="orthogonal"),
            "x",
            UnsupportedSiteError,
            r"'orthogonal' needs an even rank; site 'lin0' has r=3",
        ),
    ],
)
def test_bad_requests_leave_graph_unchanged(cfg, name, err, match):
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    lora_fx.inject(gm, LoraConfig(target_modules=["lin1"]))
    code, params = gm.code, dict(gm.named_parameters())
    with pytest.raises(err, match=match):
        lora_fx.inject(gm, cfg, name)
    assert gm.code == code and dict(gm.named_parameters()) == params


def test_inject_type_errors():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    with pytest.raises(TypeError, match="cfg must be a lora_fx.LoraConfig, got dict"):
        lora_fx.inject(gm, {"target_modules": ["lin0"]})


def test_print_trainable_parameters_format(capsys):
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    lora_fx.inject(gm, LoraConfig(r=2, target_modules=["lin0"]))
    lora_fx.print_trainable_parameters(gm)
    # A: 2x10, B: 20x2 -> 60; base: 10*20+20 + 20*2+2 = 262
    assert (
        capsys.readouterr().out
        == "trainable params: 60 || all params: 322 || trainable%: 18.6335\n"
    )
