"""Gathered mixed batches on embedding and conv sites: PEFT parity, gradients, no recompiles."""

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import (
    assert_batch_grads_equal_alone,
    assert_mixed_batch_rows,
    assert_slot_changes_do_not_recompile,
    peft_and_loaded_graph,
)
from models import TinyConv, TinyConv1d, TinyEmbedding, tiny_llama

import lora_fx
from lora_fx.math.stack import gathered_conv, gathered_embedding, gathered_linear, slot_rows
from lora_fx.passes._gather import stack_slots

ROWS = ["dog", "cat", "__base__", "owl", "cat", "dog"]


class Case(NamedTuple):
    """A tiny model with non-linear sites, its input, its targets and its gathered nodes."""

    model: Callable[[], torch.nn.Module]
    make_input: Callable[[], torch.Tensor]
    targets: list[str]
    gathered: dict  # gather function -> nodes expected


def _ids():
    ids = torch.randint(0, 100, (len(ROWS), 5))
    ids[:, 0] = 3  # every row reads token 3 (the padding row when padding_idx=3)
    return ids


CASES = {
    "embedding": Case(
        TinyEmbedding, _ids, ["emb", "lin0"], {gathered_embedding: 1, gathered_linear: 1}
    ),
    "conv2d": Case(
        TinyConv,
        lambda: torch.randn(len(ROWS), 3, 6, 6),
        ["conv0", "conv1", "lin0"],
        {gathered_conv: 2, gathered_linear: 1},
    ),
    "conv1d": Case(
        TinyConv1d,
        lambda: torch.randn(len(ROWS), 3, 12),
        ["conv0", "conv1", "lin0"],
        {gathered_conv: 2, gathered_linear: 1},
    ),
}


def _adapters(case):
    """Ranks 4 and 8 mixed; "owl" adapts the first (embedding or conv) site alone."""
    return {"cat": (4, 8), "dog": (8, 4), "owl": (4, 16, CASES[case].targets[:1])}


def _setup(tmp_path, method="export", padding_idx=None, case="embedding"):
    model = CASES[case].model().eval()
    if case == "embedding":
        model.emb.padding_idx = padding_idx
    x = CASES[case].make_input()
    targets = CASES[case].targets
    pm, gm = peft_and_loaded_graph(model, _adapters(case), targets, x, tmp_path, method=method)
    return pm, gm, x


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _check_gathered(gm, gathered):
    """Structure: one gathered node per site, no masked branch, no per-adapter node."""
    gm.graph.lint()
    targets = _targets(gm)
    assert {fn: targets.count(fn) for fn in gathered} == gathered
    assert slot_rows not in targets
    tags = {n.meta.get("lora_fx", {}).get("adapter") for n in gm.graph.nodes}
    assert not {"cat", "dog", "owl"} & tags
    roles = {
        n.meta["lora_fx"]["role"]
        for n in gm.graph.nodes
        if n.meta.get("lora_fx", {}).get("adapter") == "__batch__"
    }
    assert roles <= {"mask", "weight", "add"}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["fx", "export"])
def test_site_gathers_and_equals_peft(tmp_path, caplog, method, case):
    pm, gm, x = _setup(tmp_path, method, case=case)
    with torch.no_grad():
        expected = pm(x, adapter_names=ROWS)
        with caplog.at_level("INFO", "lora_fx"), lora_fx.adapter_batch(gm, ROWS):
            kinds = "1 embedding, 1 linear" if case == "embedding" else "2 conv, 1 linear"
            gathered = 2 if case == "embedding" else 3
            assert f"3 slots -> new graph; sites gathered {gathered} ({kinds})" in caplog.text
            _check_gathered(gm, CASES[case].gathered)
            stacks = gm.lora_fx_stacks.get_submodule(CASES[case].targets[0])
            a_shape, b_shape = {  # 3 slots + the zero slot, padded to rank 8
                "embedding": ((4, 100, 8), (4, 8, 16)),
                "conv2d": ((4, 3, 8, 3, 3), (4, 8, 8, 1, 1)),
                "conv1d": ((4, 3, 8, 3), (4, 8, 8, 1)),
            }[case]
            assert stacks.a_t.shape == a_shape and stacks.b_t.shape == b_shape
            mixed = gm(x)
        assert_close(mixed, expected)
        with lora_fx.disable_adapters(gm):
            base = gm(x)
        for row in (0, 1, 3):
            assert_differs(mixed[row], base[row])
        assert_close(mixed[2], base[2])
    assert not hasattr(gm, "lora_fx_stacks")


def _llama(tmp_path):
    model = tiny_llama().eval()
    adapters = {"cat": (4, 8), "dog": (8, 4), "owl": (4, 16, ["embed_tokens"])}
    ids = torch.randint(0, 256, (len(ROWS), 5))
    targets = ["embed_tokens", "q_proj", "v_proj"]
    pm, gm = peft_and_loaded_graph(
        model, adapters, targets, ids, tmp_path, kwargs={"use_cache": False}
    )
    return pm, gm, ids


def test_llama_embed_tokens_gathers_and_equals_peft(tmp_path):
    pm, gm, ids = _llama(tmp_path)
    with torch.no_grad():
        expected = pm(input_ids=ids, adapter_names=ROWS, use_cache=False).logits
        with lora_fx.adapter_batch(gm, ROWS):
            # 2 layers x (q_proj, v_proj)
            _check_gathered(gm, {gathered_embedding: 1, gathered_linear: 4})
            mixed = gm(ids).logits
        assert_close(mixed, expected)
        with lora_fx.disable_adapters(gm):
            base = gm(ids).logits
        for row in (0, 1, 3):
            assert_differs(mixed[row], base[row])


def test_llama_embed_tokens_training_gradients_equal_training_alone(tmp_path):
    _, gm, ids = _llama(tmp_path)
    gm.train()
    lora_fx.set_adapter_batch(gm, ROWS)
    _check_gathered(gm, {gathered_embedding: 1, gathered_linear: 4})
    assert_batch_grads_equal_alone(gm, ids, ROWS, lambda out: out.logits)


@pytest.mark.parametrize(
    ("case", "padding_idx"), [("embedding", None), ("embedding", 3), ("conv2d", None)]
)
@pytest.mark.parametrize("method", ["fx", "export"])
def test_training_gradients_equal_training_alone(tmp_path, method, case, padding_idx):
    _, gm, x = _setup(tmp_path, method, padding_idx, case)
    gm.train()
    lora_fx.set_adapter_batch(gm, ROWS)
    _check_gathered(gm, CASES[case].gathered)
    assert stack_slots in _targets(gm)  # rule 3: the stacks are built in the graph
    assert_batch_grads_equal_alone(gm, x, ROWS)
    if padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
        gm.zero_grad(set_to_none=True)
        lora_fx.set_adapter_batch(gm, ROWS)
        gm(x).pow(2).sum().backward()
        for name in ("cat", "dog", "owl"):
            column = gm.get_parameter(f"emb.lora_embedding_A.{name}").grad[:, padding_idx]
            assert column.abs().sum() == 0


@pytest.mark.parametrize("case", ["embedding", "conv2d"])
def test_new_compositions_and_slot_occupants_do_not_recompile(tmp_path, case):
    pm, gm, x = _setup(tmp_path, case=case)
    rows2 = ["owl", "owl", "dog", "cat", "__base__", "cat"]
    with torch.no_grad():
        expected = {tuple(r): pm(x, adapter_names=r) for r in (ROWS, rows2)}
    lora_fx.delete_adapter(gm, "owl")
    lora_fx.set_adapter_batch(gm, ["cat"] * 6, capacity=4)  # 2 adapters, 2 free slots
    _check_gathered(gm, CASES[case].gathered)
    assert_slot_changes_do_not_recompile(
        gm,
        x,
        load=("owl", tmp_path / "owl"),
        delete=("cat", ["owl", "dog", "__base__", "owl", "dog", "dog"]),
        expected=expected,
    )
    _check_gathered(gm, CASES[case].gathered)


def test_grouped_conv_keeps_masked_branches(caplog):
    caplog.set_level("INFO", "lora_fx")
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2)).eval()
    x = torch.randn(3, 4, 6, 6)
    gm = lora_fx.capture(model, (x,), method="fx")
    lora_fx.inject(gm, lora_fx.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    with lora_fx.adapter_batch(gm, ["default", "__base__", "default"]):
        assert "sites masked 1 (1 conv)" in caplog.text
        targets = _targets(gm)
        assert slot_rows in targets and gathered_conv not in targets
    assert_mixed_batch_rows(gm, x)
