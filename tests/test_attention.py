"""fuse_causal_attention: a constant causal mask and repeat_kv become SDPA's is_causal / enable_gqa."""

from __future__ import annotations

import sys

import pytest
import torch
import torch._dynamo
from conftest import assert_close
from models import TinyBlockStack, tiny_bert, tiny_causal_lm, tiny_gpt2, tiny_llama

import lora_fx
from lora_fx import LoraConfig
from lora_fx.capture.attention import fuse_causal_attention
from lora_fx.sites import find_sites

SDPA = torch.ops.aten.scaled_dot_product_attention.default
HF_KW = {"use_cache": False}


@pytest.fixture
def unfused(monkeypatch):
    """`lora_fx.capture` without the rewrite: the graph as torch.export made it."""
    monkeypatch.setattr(sys.modules["lora_fx.capture.trace"], "fuse_causal_attention", lambda gm: 0)
    return lora_fx.capture


def _sdpa(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def _expands_5d(gm):
    """repeat_kv's expand to [B, Hkv, n, S, D]."""
    return [
        n
        for n in gm.graph.nodes
        if n.target is torch.ops.aten.expand.default and len(n.args[1]) == 5
    ]


def _loss_and_grads(gm, ids, params):
    logits = gm(ids).logits
    loss = logits.square().mean()
    return logits, torch.autograd.grad(loss, params)


def _llama_pair(unfused, ids):
    """One Llama captured twice without the rewrite (both share the model's parameters)."""
    model = tiny_llama()
    return model, unfused(model, (ids,), HF_KW), unfused(model, (ids,), HF_KW)


def test_llama_one_rewrite_per_layer(unfused):
    ids = torch.randint(0, 256, (2, 16))
    model, before, gm = _llama_pair(unfused, ids)
    meta = [dict(n.meta) for n in _sdpa(gm)]
    assert _expands_5d(gm) and all(
        n.kwargs.get("attn_mask", n.args[3]) is not None for n in _sdpa(gm)
    )

    assert fuse_causal_attention(gm) == 2
    gm.graph.lint()
    for node, old in zip(_sdpa(gm), meta, strict=True):
        assert node.args[3] is None and node.args[5] is True and node.kwargs["enable_gqa"]
        assert node.meta["nn_module_stack"] == old["nn_module_stack"]  # sites name from it
        k, v = node.args[1:3]
        assert k.meta["val"].shape[1] == v.meta["val"].shape[1] == 2  # kv heads, not repeated
    assert not _expands_5d(gm)
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.cumsum.default]
    assert len(gm.graph.nodes) < len(before.graph.nodes)
    assert fuse_causal_attention(gm) == 0  # nothing left to rewrite

    cfg = LoraConfig(target_modules="all-linear")
    fqns = [s.fqn for s in find_sites(before, cfg)]
    assert [s.fqn for s in find_sites(gm, cfg)] == fqns


def test_capture_applies_it():
    ids = torch.randint(0, 256, (2, 16))
    model = tiny_llama().eval()
    gm = lora_fx.capture(model, (ids,), HF_KW)
    assert all(n.args[5] is True and n.kwargs["enable_gqa"] for n in _sdpa(gm))
    assert_close(gm(ids).logits, model(ids, use_cache=False).logits)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_outputs_and_grads_equal_before_and_after(unfused, train):
    ids = torch.randint(0, 256, (2, 16))
    _, before, after = _llama_pair(unfused, ids)
    for gm in (before, after):
        lora_fx.inject(gm, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    after.load_state_dict(before.state_dict())  # the same random A and B
    assert fuse_causal_attention(after) == 2
    before.train(train), after.train(train)
    p_before = [p for p in before.parameters() if p.requires_grad]
    p_after = [p for p in after.parameters() if p.requires_grad]
    out_b, grads_b = _loss_and_grads(before, ids, p_before)
    out_a, grads_a = _loss_and_grads(after, ids, p_after)
    assert_close(out_a, out_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        assert_close(a, b)


def test_saves_fewer_bytes_for_backward(unfused):
    ids = torch.randint(0, 256, (2, 32))
    _, before, after = _llama_pair(unfused, ids)
    assert fuse_causal_attention(after) == 2

    def saved_bytes(gm):
        params = {p.untyped_storage().data_ptr() for p in gm.parameters()}
        saved = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                saved[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gm(ids).logits.sum().backward()
        return sum(saved.values())

    # Per layer, SDPA saves K and V as [2, 2, 32, 16] instead of [2, 4, 32, 16] (fp32), and no
    # mask (CPU's flash kernel saves a float32 copy of a bool mask, [2, 1, 32, 32]).
    kv, mask = 2 * (2 * 2 * 32 * 16 * 4), 2 * 32 * 32 * 4
    assert saved_bytes(before) - saved_bytes(after) == 2 * (kv + mask)


def test_user_attention_mask_is_left_alone(unfused):
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, -5:] = 0  # right padding: every query still sees a key
    model = tiny_llama().eval()
    kwargs = {**HF_KW, "attention_mask": mask}
    gm = unfused(model, (ids,), kwargs)
    code = gm.code
    assert fuse_causal_attention(gm) == 0
    assert gm.code == code
    assert_close(gm(ids, attention_mask=mask).logits, model(ids, **kwargs).logits)
    captured = lora_fx.capture(model, (ids,), kwargs)
    assert not any(n.args[5:6] == (True,) for n in _sdpa(captured))


def test_gpt2_causal_mask_is_rewritten_without_gqa(unfused):
    ids = torch.randint(0, 256, (2, 16))
    model = tiny_gpt2().eval()
    gm = unfused(model, (ids,), HF_KW)
    assert fuse_causal_attention(gm) == 2
    assert all(n.args[3] is None and not n.kwargs.get("enable_gqa") for n in _sdpa(gm))
    assert_close(gm(ids).logits, model(ids, use_cache=False).logits)


def test_no_op_without_the_pattern(unfused):
    ids = torch.randint(0, 50, (2, 8))
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[1, -2:] = 0
    graphs = [
        unfused(tiny_bert().eval(), (ids,), {"attention_mask": padding}),
        unfused(TinyBlockStack().eval(), (ids,)),
        unfused(_Attention(diagonal=1), (torch.randn(2, 4, 8, 16),)),  # constant, not causal
        unfused(_Attention(rows=1), (torch.randn(2, 4, 8, 16),)),  # [1, L] row, broadcast
        unfused(_Attention(masked_input=True), (torch.randn(2, 4, 8, 16),)),
    ]
    for gm in graphs:
        code = gm.code
        assert fuse_causal_attention(gm) == 0
        assert gm.code == code


class _Attention(torch.nn.Module):
    """Self-attention over x [B, H, L, D] with a mask made in forward (or read from an input)."""

    def __init__(self, diagonal=0, *, rows=None, float_mask=False, masked_input=False):
        super().__init__()
        self.diagonal, self.rows = diagonal, rows
        self.float_mask, self.masked_input = float_mask, masked_input

    def forward(self, x):
        length = x.shape[-2]
        mask = torch.ones(self.rows or length, length, dtype=torch.bool).tril(self.diagonal)
        if self.masked_input:  # depends on the input's values: [B, 1, L, L], diagonal True
            s = x[:, :1, :, 0]
            mask = s.unsqueeze(-1) >= s.unsqueeze(-2)
        if self.float_mask:
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        return torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask)


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
def test_custom_causal_mask_is_rewritten(unfused, float_mask):
    x = torch.randn(2, 4, 8, 16)
    model = _Attention(float_mask=float_mask)
    gm = unfused(model, (x,))
    assert fuse_causal_attention(gm) == 1
    (node,) = _sdpa(gm)
    assert node.args[3] is None and node.args[5] is True
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.tril.default]
    assert_close(gm(x), model(x))


def test_compiled_rewritten_graph_matches_eager():
    ids = torch.randint(0, 256, (2, 16))
    gm = lora_fx.capture(tiny_llama(), (ids,), HF_KW)
    lora_fx.inject(gm, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    gm.train()
    params = [p for p in gm.parameters() if p.requires_grad]
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    out_c, grads_c = _loss_and_grads(compiled, ids, params)
    out_e, grads_e = _loss_and_grads(gm, ids, params)
    assert_close(out_c, out_e)
    for c, e in zip(grads_c, grads_e, strict=True):
        assert_close(c, e)


# ---- dynamic shapes ---------------------------------------------------------------------------


def _tiny_mistral(sliding_window):
    return tiny_causal_lm("mistral", sliding_window=sliding_window).eval()


def test_dynamic_llama_is_rewritten_and_exact_at_other_lengths():
    model = tiny_llama().eval()
    gm = lora_fx.capture(model, (torch.randint(0, 256, (2, 8)),))
    assert isinstance(gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape[1], torch.SymInt)
    assert all(
        n.args[3] is None and n.args[5] is True and n.kwargs["enable_gqa"] for n in _sdpa(gm)
    )
    assert not _expands_5d(gm)
    for shape in [(1, 1), (1, 5), (3, 21)]:
        ids = torch.randint(0, 256, shape)
        assert_close(gm(ids).logits, model(ids, use_cache=False).logits)


@pytest.mark.parametrize("window", [4, None], ids=["window4", "no_window"])
def test_dynamic_sliding_window_mask_is_kept(window):
    # A window of 4 looks causal at the example's length 4: only a check past it tells them apart.
    model = _tiny_mistral(window)
    gm = lora_fx.capture(model, (torch.randint(0, 256, (2, 4)),))
    fused = [n.args[5:6] == (True,) for n in _sdpa(gm)]
    assert fused == [window is None] * 2
    ids = torch.randint(0, 256, (2, 13))
    assert_close(gm(ids).logits, model(ids, use_cache=False).logits)


def test_dynamic_padding_mask_is_left_alone():
    model = tiny_llama().eval()
    ids, mask = torch.randint(0, 256, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    gm = lora_fx.capture(model, (ids,), {"attention_mask": mask})
    assert all(n.args[3] is not None and n.args[5:6] != (True,) for n in _sdpa(gm))
    assert _expands_5d(gm)  # GQA with a mask keeps repeat_kv, as transformers does
