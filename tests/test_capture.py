import pytest
import torch
from conftest import assert_close
from models import TinyMLP, tiny_gpt2

import lora_fx
from lora_fx import CaptureError, LoraConfig


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: neither method can capture it
            return self.lin(x)
        return x


@pytest.mark.parametrize("method", ["fx", "export"])
def test_train_eval_switch_base_dropout(method):
    model = TinyMLP().eval()
    x = torch.randn(64, 10)
    gm = lora_fx.capture(model, (x,), method=method)
    assert not gm.training
    assert_close(gm(x), model(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x)), "dropout should be live in train mode"
    gm.eval()
    assert_close(gm(x), model(x))
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]


def test_capture_keeps_model_mode_and_restores_it():
    model = TinyMLP().train()
    gm = lora_fx.capture(model, (torch.randn(2, 10),))
    assert model.training and gm.training


def test_export_binds_constant_kwargs_and_keeps_dropout_live():
    model = tiny_gpt2().eval()
    ids = torch.randint(0, 256, (1, 8))
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    assert_close(gm(ids).logits, model(ids, use_cache=False).logits)
    drop_modules = [n for n in gm.graph.nodes if n.op == "call_module" and "drop" in n.target]
    assert drop_modules, "GPT-2's dropouts should be modules"
    gm.train()
    assert not torch.equal(gm(ids).logits, gm(ids).logits)


def test_graph_shares_parameters_with_model():
    model = TinyMLP().eval()
    x = torch.randn(3, 10)
    gm = lora_fx.capture(model, (x,))
    assert gm.lin0.weight is model.lin0.weight
    before = model.lin0.weight.detach().clone()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    lora_fx.merge(gm)
    assert not torch.equal(model.lin0.weight, before), (
        "merge folds into the shared weight (documented)"
    )
    lora_fx.unmerge(gm)
    assert_close(model.lin0.weight, before)


def test_fx_capture_leaves_user_modules_alone():
    model = TinyMLP().eval()
    gm = lora_fx.capture(model, (torch.randn(2, 10),), method="fx")
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"]))
    assert not hasattr(model.lin0, "lora_A"), "inject must not add children to the user's modules"
    assert "lin0.lora_A.default.weight" in gm.state_dict()


def test_inject_accepts_exported_program():
    model = TinyMLP().eval()
    x = torch.randn(2, 10)
    program = torch.export.export(model, (x,))
    gm = lora_fx.inject(program, LoraConfig(target_modules=["lin0"]))
    assert isinstance(gm, torch.fx.GraphModule)
    assert_close(gm(x), model(x))
    gm.train()  # export's own module refuses this


def test_export_failure_says_why_and_suggests_fx():
    with pytest.raises(
        CaptureError, match=r"method='export' failed on DataDependent: .*try method='fx'"
    ):
        lora_fx.capture(DataDependent(), (torch.randn(2, 4),))


def test_fx_failure_suggests_export():
    with pytest.raises(
        CaptureError, match=r"method='fx' failed on DataDependent: .*need method='export'"
    ):
        lora_fx.capture(DataDependent(), (torch.randn(2, 4),), method="fx")


def test_bad_method_and_bad_model():
    with pytest.raises(
        ValueError, match=r"method='jit' is invalid; expected one of \['export', 'fx'\]"
    ):
        lora_fx.capture(TinyMLP(), (torch.randn(2, 10),), method="jit")
    with pytest.raises(TypeError, match="capture\\(\\) needs an nn.Module, got function"):
        lora_fx.capture(lambda x: x, (torch.randn(2, 10),))
    with pytest.raises(
        TypeError, match="expected a torch.fx.GraphModule or torch.export.ExportedProgram"
    ):
        lora_fx.inject(TinyMLP(), LoraConfig(target_modules=["lin0"]))
