"""Gathered mixed batches on embedding sites: PEFT parity, training gradients, no recompiles."""

import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import (
    assert_batch_grads_equal_alone,
    assert_slot_changes_do_not_recompile,
    peft_with_adapters,
)
from models import TinyEmbedding, tiny_llama

import lora_fx
from lora_fx.math.stack import gathered_embedding, gathered_linear, slot_rows
from lora_fx.passes._gather import stack_slots

# Ranks 4 and 8 mixed; "owl" adapts the embedding alone.
ADAPTERS = {"cat": (4, 8, None), "dog": (8, 4, None), "owl": (4, 16, ["emb"])}
ROWS = ["dog", "cat", "__base__", "owl", "cat", "dog"]


def _setup(tmp_path, method="export", padding_idx=None, adapters=ADAPTERS):
    model = TinyEmbedding().eval()
    model.emb.padding_idx = padding_idx
    pm = peft_with_adapters(model, adapters, ["emb", "lin0"], tmp_path)
    ids = torch.randint(0, 100, (len(ROWS), 5))
    ids[:, 0] = 3  # every row reads token 3 (the padding row when padding_idx=3)
    gm = lora_fx.capture(model, (ids,), method=method)
    for name in adapters:
        lora_fx.load_adapter(gm, tmp_path / name, name)
    return pm, gm, ids


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _check_gathered(gm, embeddings, linears):
    """Structure: one gathered node per site, no masked branch, no per-adapter node."""
    gm.graph.lint()
    targets = _targets(gm)
    assert targets.count(gathered_embedding) == embeddings
    assert targets.count(gathered_linear) == linears
    assert slot_rows not in targets
    tags = {n.meta.get("lora_fx", {}).get("adapter") for n in gm.graph.nodes}
    assert not set(ADAPTERS) & tags
    roles = {
        n.meta["lora_fx"]["role"]
        for n in gm.graph.nodes
        if n.meta.get("lora_fx", {}).get("adapter") == "__batch__"
    }
    assert roles <= {"mask", "weight", "add"}


@pytest.mark.parametrize("method", ["fx", "export"])
def test_embedding_site_gathers_and_equals_peft(tmp_path, method):
    pm, gm, ids = _setup(tmp_path, method)
    with torch.no_grad():
        expected = pm(ids, adapter_names=ROWS)
        with lora_fx.adapter_batch(gm, ROWS):
            _check_gathered(gm, embeddings=1, linears=1)
            stacks = gm.lora_fx_stacks.get_submodule("emb")
            assert stacks.a_t.shape == (4, 100, 8) and stacks.b_t.shape == (4, 8, 16)
            mixed = gm(ids)
        assert_close(mixed, expected)
        with lora_fx.disable_adapters(gm):
            base = gm(ids)
        for row in (0, 1, 3):
            assert_differs(mixed[row], base[row])
        assert_close(mixed[2], base[2])
    assert not hasattr(gm, "lora_fx_stacks")


def test_llama_embed_tokens_gathers_and_equals_peft(tmp_path):
    model = tiny_llama().eval()
    adapters = {"cat": (4, 8, None), "dog": (8, 4, None), "owl": (4, 16, ["embed_tokens"])}
    pm = peft_with_adapters(model, adapters, ["embed_tokens", "q_proj", "v_proj"], tmp_path)
    ids = torch.randint(0, 256, (len(ROWS), 5))
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    for name in adapters:
        lora_fx.load_adapter(gm, tmp_path / name, name)
    with torch.no_grad():
        expected = pm(input_ids=ids, adapter_names=ROWS, use_cache=False).logits
        with lora_fx.adapter_batch(gm, ROWS):
            _check_gathered(gm, embeddings=1, linears=4)  # 2 layers x (q_proj, v_proj)
            mixed = gm(ids).logits
        assert_close(mixed, expected)
        with lora_fx.disable_adapters(gm):
            base = gm(ids).logits
        for row in (0, 1, 3):
            assert_differs(mixed[row], base[row])


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("method", ["fx", "export"])
def test_embedding_training_gradients_equal_training_alone(tmp_path, method, padding_idx):
    _, gm, ids = _setup(tmp_path, method, padding_idx)
    gm.train()
    lora_fx.set_adapter_batch(gm, ROWS)
    _check_gathered(gm, embeddings=1, linears=1)
    assert stack_slots in _targets(gm)  # rule 3: the stacks are built in the graph
    assert_batch_grads_equal_alone(gm, ids, ROWS)
    if padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
        gm.zero_grad(set_to_none=True)
        lora_fx.set_adapter_batch(gm, ROWS)
        gm(ids).pow(2).sum().backward()
        for name in ADAPTERS:
            column = gm.get_parameter(f"emb.lora_embedding_A.{name}").grad[:, padding_idx]
            assert column.abs().sum() == 0


def test_new_compositions_and_slot_occupants_do_not_recompile(tmp_path):
    pm, gm, ids = _setup(tmp_path)
    rows2 = ["owl", "owl", "dog", "cat", "__base__", "cat"]
    with torch.no_grad():
        expected = {tuple(r): pm(ids, adapter_names=r) for r in (ROWS, rows2)}
    lora_fx.delete_adapter(gm, "owl")
    lora_fx.set_adapter_batch(gm, ["cat"] * 6, capacity=4)  # 2 adapters, 2 free slots
    _check_gathered(gm, embeddings=1, linears=1)
    assert_slot_changes_do_not_recompile(
        gm,
        ids,
        load=("owl", tmp_path / "owl"),
        delete=("cat", ["owl", "dog", "__base__", "owl", "dog", "dog"]),
        expected=expected,
    )
    _check_gathered(gm, embeddings=1, linears=1)


def test_gathered_embedding_by_hand():
    # Two slots over a 3-row table, r 1; row 0 reads slot 1, row 1 slot 0.
    a_t = torch.tensor([[[1.0], [2.0], [3.0]], [[10.0], [20.0], [30.0]]])  # [slots, num, r]
    b_t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [slots, r, dim]
    ids = torch.tensor([[0, 2], [1, 1]])
    y = torch.zeros(2, 2, 2)
    out = gathered_embedding(y, ids, torch.tensor([1, 0]), a_t, b_t)
    expected = torch.tensor([[[0.0, 10.0], [0.0, 30.0]], [[2.0, 0.0], [2.0, 0.0]]])
    torch.testing.assert_close(out, expected)
