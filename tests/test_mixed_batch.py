"""Mixed-batch inference: one forward, one adapter per row, compared with PEFT and per-sample runs."""

import copy

import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import (
    assert_batch_grads_equal_alone,
    assert_slot_changes_do_not_recompile,
    peft_and_loaded_graph,
)
from models import TinyMLP, tiny_gpt2, tiny_llama
from peft import LoraConfig as PeftConfig
from peft import get_peft_model

import lora_fx
from lora_fx import AdapterError

ROWS = ["cat", "dog", "__base__", "cat"]


def _setup(tmp_path, which):
    if which == "mlp":
        model, x, kw, targets = TinyMLP().eval(), torch.randn(4, 10), None, ["lin0", "lin1"]
    elif which == "gpt2":  # addmm sites see [batch * seq, in] rows
        model, x, kw, targets = (
            tiny_gpt2().eval(),
            torch.randint(0, 256, (4, 6)),
            {"use_cache": False},
            ["c_attn", "c_fc"],
        )
    else:
        model, x, kw, targets = (
            tiny_llama().eval(),
            torch.randint(0, 256, (4, 6)),
            {"use_cache": False},
            ["q_proj", "down_proj"],
        )
    pm = get_peft_model(
        copy.deepcopy(model),
        PeftConfig(r=4, target_modules=targets, init_lora_weights=False),
        "cat",
    )
    pm.add_adapter(
        "dog", PeftConfig(r=2, lora_alpha=5, target_modules=targets[:1], init_lora_weights=False)
    )
    pm.eval()
    pm.save_pretrained(tmp_path)
    gm = lora_fx.capture(model, (x,), kw)
    lora_fx.load_adapter(gm, tmp_path / "cat", "cat")
    lora_fx.load_adapter(gm, tmp_path / "dog", "dog")
    return pm, gm, x, kw is not None


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("which", ["mlp", "gpt2", "llama"])
def test_mixed_batch_equals_peft_and_per_sample(tmp_path, which):
    pm, gm, x, hf = _setup(tmp_path, which)
    with torch.no_grad():
        expected = _logits(
            pm(input_ids=x, adapter_names=ROWS, use_cache=False)
            if hf
            else pm(x, adapter_names=ROWS)
        )
        with lora_fx.adapter_batch(gm, ROWS):
            mixed = _logits(gm(x))
        assert_close(mixed, expected)
        for row, name in enumerate(ROWS):
            if name == "__base__":
                with lora_fx.disable_adapters(gm):
                    alone = _logits(gm(x))[row]
            else:
                lora_fx.set_adapter(gm, name)
                alone = _logits(gm(x))[
                    row
                ]  # the graph is shape-specialised: run the batch, keep the row
            assert_close(mixed[row], alone)
    assert not hasattr(gm, "lora_fx_adapter_index")


def test_new_composition_does_not_recompile(tmp_path):
    _, gm, x, _ = _setup(tmp_path, "mlp")
    reference = {}
    for rows in (ROWS, ["dog", "dog", "cat", "__base__"]):
        with torch.no_grad(), lora_fx.adapter_batch(gm, rows):
            reference[tuple(rows)] = gm(x)
    lora_fx.set_adapter_batch(gm, ROWS)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), reference[tuple(ROWS)])
        torch._dynamo.config.error_on_recompile = True
        try:
            lora_fx.set_adapter_batch(gm, ["dog", "dog", "cat", "__base__"])
            assert_close(compiled(x), reference[("dog", "dog", "cat", "__base__")])
        finally:
            torch._dynamo.config.error_on_recompile = False
    lora_fx.set_adapter_batch(gm, None)
    torch._dynamo.reset()


def test_bad_mixed_batches(tmp_path):
    _, gm, x, _ = _setup(tmp_path, "mlp")
    code = gm.code
    with pytest.raises(
        AdapterError,
        match=r"unknown adapter\(s\) \['cow'\] in the batch; adapters on this graph: \['cat', 'dog'\]",
    ):
        lora_fx.set_adapter_batch(gm, ["cat", "cow"])
    with pytest.raises(AdapterError, match=r"capacity=0 is invalid; pass a positive int or None"):
        lora_fx.set_adapter_batch(gm, ["cat"], capacity=0)
    lora_fx.merge(gm)
    code = gm.code
    with pytest.raises(AdapterError, match=r"adapters \['cat'\] are merged"):
        lora_fx.set_adapter_batch(gm, ["cat"])
    assert gm.code == code
    lora_fx.unmerge(gm)
    lora_fx.set_adapter_batch(gm, ["cat", "dog", "cat", "dog"])
    with pytest.raises(AdapterError, match="mixed-batch mode is on"):
        lora_fx.set_adapter(gm, "dog")


def test_batch_and_name_list_must_have_the_same_length(tmp_path):
    _, gm, x, _ = _setup(tmp_path, "mlp")  # 4 rows
    for names in (["cat", "dog"], ["cat", "dog", "cat"]):
        with (
            pytest.raises(
                RuntimeError,
                match="mixed batch: the batch and the adapter name list differ in length",
            ),
            torch.no_grad(),
            lora_fx.adapter_batch(gm, names),
        ):
            gm(x)


# Ranks 8 and 16 mixed, on every linear site (gathered) of a tiny Llama / GPT-2.
MIXED = {"a8": (8, 16), "b16": (16, 8), "c8": (8, 32)}
MIXED_ROWS = ["b16", "a8", "__base__", "c8", "a8", "b16"]


def _mixed_setup(tmp_path, which, adapters=MIXED):
    model = (tiny_llama() if which == "llama" else tiny_gpt2()).eval()
    targets = ["q_proj", "v_proj", "down_proj"] if which == "llama" else ["c_attn", "c_fc"]
    ids = torch.randint(0, 256, (len(MIXED_ROWS), 5))
    kwargs = {"use_cache": False}
    pm, gm = peft_and_loaded_graph(model, adapters, targets, ids, tmp_path, kwargs=kwargs)
    return pm, gm, ids


def _gathered(gm):
    return sum(
        n.target is lora_fx.math.stack.gathered_linear
        for n in gm.graph.nodes
        if n.op == "call_function"
    )


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_gathered_mixed_ranks_equal_peft(tmp_path, which):
    pm, gm, ids = _mixed_setup(tmp_path, which)
    with torch.no_grad():
        expected = pm(input_ids=ids, adapter_names=MIXED_ROWS, use_cache=False).logits
        with lora_fx.adapter_batch(gm, MIXED_ROWS):
            gm.graph.lint()
            sites = 6 if which == "llama" else 4  # one gathered node per site, whatever the count
            assert _gathered(gm) == sites
            tags = [n.meta.get("lora_fx", {}).get("adapter") for n in gm.graph.nodes]
            assert not set(MIXED) & set(tags)  # no per-adapter branch
            assert (
                gm.lora_fx_stacks.get_submodule(
                    "model.layers.0.self_attn.q_proj"
                    if which == "llama"
                    else "transformer.h.0.attn.c_attn"
                ).a_t.shape[-1]
                == 16
            )  # padded to the largest rank
            mixed = gm(ids).logits
        assert_close(mixed, expected)
        with lora_fx.disable_adapters(gm):
            base = gm(ids).logits
        for row in (0, 1, 3):  # the adapters change those rows: the check is not vacuous
            assert_differs(mixed[row], base[row])
    assert not hasattr(gm, "lora_fx_stacks")
    assert _gathered(gm) == 0


def test_new_adapters_and_compositions_do_not_recompile(tmp_path):
    pm, gm, ids = _mixed_setup(tmp_path, "llama")
    rows2 = ["c8", "c8", "b16", "a8", "__base__", "a8"]
    with torch.no_grad():
        expected = {
            tuple(r): pm(input_ids=ids, adapter_names=r, use_cache=False).logits
            for r in (MIXED_ROWS, rows2)
        }
    lora_fx.delete_adapter(gm, "c8")
    lora_fx.set_adapter_batch(gm, ["a8"] * 6, capacity=4)  # 2 adapters, 2 free slots
    assert_slot_changes_do_not_recompile(
        gm,
        ids,
        load=("c8", tmp_path / "c8"),
        delete=("a8", ["c8", "b16", "__base__", "c8", "c8", "b16"]),
        expected=expected,
        out=_logits,
    )
    state = gm.meta["lora_fx"]
    assert state.batch_adapters == [None, "b16", "c8", None]


def test_full_slots_evict_an_unused_adapter(tmp_path):
    _, gm, ids = _mixed_setup(tmp_path, "llama")
    state = gm.meta["lora_fx"]
    lora_fx.delete_adapter(gm, "c8")
    lora_fx.set_adapter_batch(gm, ["a8"] * 6)  # capacity 2: a8, b16
    lora_fx.load_adapter(gm, tmp_path / "c8", "c8")
    code = gm.code
    lora_fx.set_adapter_batch(gm, ["c8", "a8", "a8", "c8", "a8", "a8"])  # b16 makes room
    assert state.batch_adapters == ["a8", "c8"] and gm.code == code
    lora_fx.set_adapter_batch(gm, MIXED_ROWS)  # three adapters in one batch: the stacks grow
    assert len(state.batch_adapters) == 3
    stacks = gm.lora_fx_stacks.get_submodule("model.layers.0.self_attn.q_proj")
    assert stacks.a_t.shape == (4, 64, 16)  # 3 slots + the zero slot, padded to rank 16
    lora_fx.set_adapter_batch(gm, MIXED_ROWS, rank=32)  # room for larger adapters: a new graph
    stacks = gm.lora_fx_stacks.get_submodule("model.layers.0.self_attn.q_proj")
    assert stacks.a_t.shape == (4, 64, 32) and state.batch_rank == 32


def test_hotswap_and_refresh_rewrite_the_stacks(tmp_path):
    pm, gm, ids = _mixed_setup(tmp_path, "llama")
    rows = ["a8"] * 6
    with torch.no_grad():
        pm.set_adapter("c8")
        expected = pm(input_ids=ids, use_cache=False).logits
        lora_fx.set_adapter_batch(gm, rows)
        lora_fx.load_adapter(gm, tmp_path / "c8", "a8", hotswap=True)  # c8's weights, r 8
        assert_close(gm(ids).logits, expected)
        for name, param in gm.named_parameters():
            if ".lora_B.a8." in name:
                param.zero_()  # by hand: the stacks keep their copy until refresh=True
        assert_close(gm(ids).logits, expected)
        lora_fx.set_adapter_batch(gm, rows, refresh=True)
        with pm.disable_adapter():
            assert_close(gm(ids).logits, pm(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_mixed_batch_training_gradients_equal_training_alone(tmp_path, which):
    _, gm, ids = _mixed_setup(tmp_path, which)
    for module in gm.modules():  # GPT-2's own dropout would make the two runs differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rows = ["a8", "b16", "a8", "__base__", "b16", "c8"]
    assert_batch_grads_equal_alone(gm, ids, rows, _logits)
