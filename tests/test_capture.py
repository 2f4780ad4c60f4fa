import pytest
import torch
from conftest import assert_close
from models import TinyMLP, tiny_bert, tiny_gpt2, tiny_llama
from torch.export import Dim

import lora_fx
from lora_fx import CaptureError, LoraConfig

SDPA = torch.ops.aten.scaled_dot_product_attention.default


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


# ---- shapes: dynamic batch and sequence by default for transformers models --------------------


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_transformers_capture_runs_at_other_shapes(make):
    model = make().eval()
    gm = lora_fx.capture(model, (torch.randint(0, 256, (2, 8)),))
    for shape in [(1, 5), (3, 13), (2, 8)]:
        ids = torch.randint(0, 256, shape)
        assert_close(_logits(gm(ids)), _logits(model(ids)))


def test_batch_of_one_example_still_gives_a_dynamic_batch():
    model = tiny_llama().eval()
    gm = lora_fx.capture(model, (torch.randint(0, 256, (1, 16)),), {"use_cache": False})
    ids = torch.randint(0, 256, (3, 9))
    assert_close(gm(ids).logits, model(ids).logits)


def test_left_padded_attention_mask_is_an_input():
    model = tiny_llama().eval()
    ids, mask = torch.randint(0, 256, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    gm = lora_fx.capture(model, (ids,), {"attention_mask": mask, "use_cache": False})
    assert all(n.args[3] is not None and n.args[5:6] != (True,) for n in _sdpa(gm))  # not fused
    ids = torch.randint(0, 256, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = mask[2, :7] = 0  # left padding
    out = gm(ids, attention_mask=mask).logits
    expected = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(out[real], expected[real])
    assert not torch.equal(out[0, -1], gm(ids, attention_mask=torch.ones_like(mask)).logits[0, -1])


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def test_inject_merge_on_a_dynamic_graph_at_two_shapes():
    model = tiny_llama().eval()
    gm = lora_fx.capture(model, (torch.randint(0, 256, (2, 8)),))
    lora_fx.inject(gm, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    shapes = [(1, 5), (3, 13)]
    inputs = [torch.randint(0, 256, s) for s in shapes]
    with torch.no_grad():
        adapted = [gm(ids).logits for ids in inputs]
        lora_fx.merge(gm)
        for ids, out in zip(inputs, adapted, strict=True):
            assert_close(gm(ids).logits, out)
        lora_fx.unmerge(gm)
        lora_fx.unload(gm)
        for ids in inputs:
            assert_close(gm(ids).logits, model(ids).logits)


@pytest.mark.parametrize("opt_out", [None, False])
def test_dynamic_shapes_none_or_false_captures_static_shapes(opt_out):
    model = tiny_llama().eval()
    gm = lora_fx.capture(model, (torch.randint(0, 256, (2, 8)),), dynamic_shapes=opt_out)
    with pytest.raises(
        ValueError,
        match=r"input 'input_ids' has shape \(3, 5\); the graph was captured for shape "
        r"\(2, 8\) \(axis 0 = 2, axis 1 = 8 static\)",
    ):
        gm(torch.randint(0, 256, (3, 5)))


def test_callers_dynamic_shapes_win_and_custom_models_stay_static():
    model = tiny_llama().eval()
    ids = torch.randint(0, 256, (2, 8))
    gm = lora_fx.capture(model, (ids,), dynamic_shapes={"input_ids": {1: Dim("seq", max=32)}})
    assert_close(gm(ids[:, :5]).logits, model(ids[:, :5]).logits)
    with pytest.raises(ValueError, match=r"axis 0 = 2 static"):
        gm(torch.randint(0, 256, (3, 8)))
    mlp = TinyMLP().eval()
    static = lora_fx.capture(mlp, (torch.randn(4, 10),))  # custom models stay static
    with pytest.raises(ValueError, match=r"input 'x' has shape \(3, 10\).*\(4, 10\)"):
        static(torch.randn(3, 10))
    dynamic = lora_fx.capture(mlp, (torch.randn(4, 10),), dynamic_shapes={"x": {0: Dim.AUTO}})
    x = torch.randn(7, 10)
    assert_close(dynamic(x), mlp(x))


def test_static_axis_warns_at_capture():
    with pytest.warns(UserWarning, match=r"export kept input_ids axis 1 = 1 static"):
        lora_fx.capture(tiny_llama().eval(), (torch.randint(0, 256, (2, 1)),))


def test_use_cache_is_off_by_default_and_true_is_refused():
    model = tiny_llama().eval()
    ids = torch.randint(0, 256, (2, 8))
    gm = lora_fx.capture(model, (ids,))
    assert gm(ids).past_key_values is None
    assert_close(gm(ids).logits, model(ids, use_cache=False).logits)
    with pytest.raises(ValueError, match=r"no KV cache.*lora_fx.capture_for_generation"):
        lora_fx.capture(model, (ids,), {"use_cache": True})


def test_dict_args_say_to_pass_kwargs():
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(TypeError, match=r"args is a dict \(keys \['input_ids'\]\); pass .*kwargs"):
        lora_fx.capture(tiny_llama(), {"input_ids": ids})
    model = tiny_llama().eval()
    gm = lora_fx.capture(model, (), {"input_ids": ids})
    assert_close(gm(input_ids=ids).logits, model(ids).logits)


def test_dimension_that_cannot_be_dynamic_names_input_and_axis():
    with pytest.raises(
        CaptureError,
        match=r"input 'x' axis 1 cannot be dynamic: .*dynamic_shapes=\{'x': \{1: Dim.STATIC",
    ):
        lora_fx.capture(TinyMLP(), (torch.randn(4, 10),), dynamic_shapes={"x": {1: Dim.DYNAMIC}})
    with pytest.raises(CaptureError, match=r"input 'x' axis 1 cannot be dynamic: You marked feat"):
        lora_fx.capture(TinyMLP(), (torch.randn(4, 10),), dynamic_shapes={"x": {1: Dim("feat")}})
    with pytest.raises(CaptureError, match=r"positional input 0 axis 1 .*entry \[0\]\[1\]"):
        lora_fx.capture(TinyMLP(), (torch.randn(4, 10),), dynamic_shapes=((None, Dim("feat")),))
    with pytest.raises(CaptureError, match=r"input 'x' axis 0 .*use one of size 2 or more"):
        lora_fx.capture(TinyMLP(), (torch.randn(1, 10),), dynamic_shapes={"x": {0: Dim.DYNAMIC}})


def test_calls_outside_the_capture_raise_value_errors():
    gm = lora_fx.capture(tiny_bert().eval(), (torch.randint(0, 256, (2, 8)),))
    with pytest.raises(
        ValueError,
        match=r"input 'input_ids' has shape \(2, 3, 4\); the graph was captured for shape "
        r"\(\*, \*\)",
    ):
        gm(torch.randint(0, 256, (2, 3, 4)))
    with pytest.raises(ValueError, match=r"input_ids.size\(\)\[1\] <= 64.*\(2, 100\)"):
        gm(torch.randint(0, 256, (2, 100)))  # BERT has 64 positions


def test_transformers_export_failure_does_not_suggest_fx():
    with pytest.raises(CaptureError, match=r"method='export' failed on LlamaForCausalLM") as info:
        lora_fx.capture(tiny_llama(), (torch.randn(2, 8),))  # float ids: the embedding fails
    assert "method='fx'" not in str(info.value)


class NoGradBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():  # reads a parameter: no gradient may reach it
            y = self.lin(x)
        return x * y


def test_inlined_no_grad_region_still_gives_no_gradient():
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    model = NoGradBranch()
    gm = lora_fx.capture(model, (torch.randn(3, 4),), dynamic_shapes={"x": {0: Dim.AUTO}})
    assert not [n for n in gm.graph.nodes if n.target is hop]
    gm(torch.randn(5, 4, requires_grad=True)).sum().backward()
    assert model.lin.weight.grad is None
