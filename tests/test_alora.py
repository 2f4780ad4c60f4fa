"""aLoRA (PEFT 0.21.2's `alora_invocation_tokens`) against PEFT itself.

The adapter acts from the last occurrence of the invocation tokens on: rows with them at
different places, twice, not at all, and padded rows give PEFT's logits and gradients; earlier
positions are the base model's bitwise. Files go both ways, merge is refused (PEFT refuses it
too), bad tokens and non-linear sites are refused with the graph unchanged, new offsets do not
recompile, and `generate` gives `PeftModel.generate`'s tokens.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import assert_batch_grads_equal_alone, lora_roles, peft_and_lora_fx
from models import tiny_causal_lm, tiny_llama
from peft.tuners.lora.variants import calculate_alora_offsets
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lora_fx
from lora_fx import AdapterError, ConfigError, LoraConfig, MergeError, UnsupportedSiteError
from lora_fx.exporters import export_onnx
from lora_fx.math.alora import alora_mask, alora_offsets
from lora_fx.math.stack import gathered_linear

INVOKE = [7, 9]
pytestmark = [
    pytest.mark.filterwarnings("ignore:aLoRA is currently only supported:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]


class _TokenMlp(nn.Module):
    """emb (50 x 16) -> up (16 -> 24) -> relu -> down (24 -> 8), per token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.emb(ids))))


def _ids(vocab: int = 50, rows: int = 4, seq: int = 10) -> torch.Tensor:
    """Row 0: invocation at 4; row 1: at 1 and 7 (the last counts); row 2: none; row 3: at 0."""
    ids = torch.randint(10, vocab, (rows, seq), generator=torch.Generator().manual_seed(3))
    for row, start in ((0, 4), (1, 1), (1, 7), (3, 0)):
        if row < rows:
            ids[row, start : start + 2] = torch.tensor(INVOKE)
    return ids


def _cfg(**extra) -> dict:
    cfg = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "alora_invocation_tokens": INVOKE}
    return {"target_modules": ["up", "down"], **cfg, **extra}


def _mlp_pair(method: str, **extra):
    torch.manual_seed(0)
    model, ids = _TokenMlp().eval(), _ids()
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), method=method)
    pm, gm = peft_and_lora_fx(model, gm, _cfg(**extra))
    return model, pm, gm, ids


def _peft_offsets(pm, ids):
    return calculate_alora_offsets(pm.peft_config, "default", ids)


def _assert_equals_peft(model, pm, gm, ids) -> None:
    """Offsets from `ids`, then PEFT's outputs; row 2 (no invocation) is the base model's."""
    lora_fx.set_alora_offsets(gm, ids)
    with torch.no_grad():
        ours = gm(ids)
        assert_close(ours, pm(ids, alora_offsets=_peft_offsets(pm, ids)))
        assert torch.equal(ours[2], model(ids)[2])


# ---- math ------------------------------------------------------------------------------------


def test_offsets_and_mask_by_hand():
    ids = torch.tensor([[5, 7, 9, 3, 7, 9, 1], [7, 9, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 7]])
    # last occurrence, counted from the row's end; 0 where PEFT says None
    assert alora_offsets(ids, INVOKE).tolist() == [3, 7, 0]
    class_cfg = type("C", (), {"alora_invocation_tokens": INVOKE})()
    assert calculate_alora_offsets({"d": class_cfg}, "d", ids) == [3, 7, None]
    mask = alora_mask(torch.tensor([3, 7, 0]), torch.zeros(3, 7, 2))
    assert mask.shape == (3, 7, 1)
    assert mask[..., 0].tolist() == [[0, 0, 0, 0, 1, 1, 1], [1] * 7, [0] * 7]
    # a decode step (T = 1): rows that found the invocation are adapted
    assert alora_mask(torch.tensor([3, 7, 0]), torch.zeros(3, 1, 2))[:, 0, 0].tolist() == [1, 1, 0]
    # a flattened [batch * T, features] site gets each row's mask repeated
    flat = alora_mask(torch.tensor([3, 7, 0]), torch.zeros(21, 2))
    assert torch.equal(flat.view(3, 7), mask[..., 0])
    assert alora_mask(torch.zeros(0, dtype=torch.long), torch.ones(2, 3, 4)).sum() == 0
    assert alora_offsets(torch.tensor([[7]]), INVOKE).tolist() == [0]  # shorter than the tokens


# ---- custom model, both capture methods ------------------------------------------------------


@pytest.mark.parametrize("method", ["fx", "export"])
def test_mlp_outputs_and_gradients_equal_peft(method):
    model, pm, gm, ids = _mlp_pair(method)
    gm.graph.lint()
    assert lora_roles(gm)["mask"] == 2 * 3  # per site: offsets, mask, mul
    offsets = _peft_offsets(pm, ids)
    assert offsets == [6, 3, None, 10]
    assert lora_fx.set_alora_offsets(gm, ids) is gm
    ours, theirs, base = gm(ids), pm(ids, alora_offsets=offsets), model(ids)
    assert_differs(theirs, base)
    assert_close(ours, theirs)
    start = [4, 7, 10, 0]  # positions before the invocation: the base model's, bitwise
    for row, s in enumerate(start):
        assert torch.equal(ours[row, :s], base[row, :s])
        if s < ids.shape[1]:
            assert_differs(ours[row, s:], base[row, s:])
    ours.square().sum().backward()
    theirs.square().sum().backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    assert len(grads) == 4
    for name, grad in grads.items():
        assert_close(grad, pm.get_parameter(f"base_model.model.{name}").grad)


def test_offsets_given_as_peft_list_and_cleared():
    model, pm, gm, ids = _mlp_pair("fx")
    with torch.no_grad():
        assert torch.equal(gm(ids), model(ids))  # rule 3: no offsets set, no row adapted
        lora_fx.set_alora_offsets(gm, alora_offsets=[2, None, 10, 0])
        assert_close(gm(ids), pm(ids, alora_offsets=[2, None, 10, 0]))
        lora_fx.set_alora_offsets(gm)
        assert torch.equal(gm(ids), model(ids))


@pytest.mark.parametrize("layout", lora_fx.LAYOUTS)
def test_every_layout_equals_peft(layout):
    model, pm, gm, ids = _mlp_pair("export")
    lora_fx.set_layout(gm, layout)  # "weight" cannot carry a per-row mask: it takes "fused"
    _assert_equals_peft(model, pm, gm, ids)


def test_lora_bias_is_masked_too():
    model, pm, gm, ids = _mlp_pair("export", lora_bias=True)
    for site in ("up", "down"):
        bias = torch.randn_like(gm.get_submodule(site).lora_B["default"].bias)
        with torch.no_grad():
            gm.get_submodule(site).lora_B["default"].bias.copy_(bias)
            pm.base_model.model.get_submodule(site).lora_B["default"].bias.copy_(bias)
    _assert_equals_peft(model, pm, gm, ids)


def test_switching_and_deleting_adapters():
    model, _, gm, ids = _mlp_pair("fx")
    lora_fx.inject(gm, LoraConfig(**_cfg(alora_invocation_tokens=None)), "plain")
    lora_fx.set_alora_offsets(gm, ids)  # the inactive-or-not aLoRA adapter's offsets only
    with torch.no_grad():
        alora = gm(ids)
        lora_fx.set_adapter(gm, "plain")
        assert not torch.equal(gm(ids)[2], model(ids)[2])  # plain LoRA: every row
        lora_fx.set_adapter(gm, ["default", "plain"])
        lora_fx.delete_adapter(gm, "plain")
        assert torch.equal(gm(ids), alora)
        lora_fx.delete_adapter(gm, "default")
    assert not any("alora" in n for n, _ in gm.named_buffers())
    gm.graph.lint()


def test_delete_and_unload_drop_the_offsets():
    model, _, gm, ids = _mlp_pair("fx")
    lora_fx.set_alora_offsets(gm, ids)
    assert "up.lora_alora_offsets.default" in dict(gm.named_buffers())
    assert not any("alora" in k for k in gm.state_dict())  # never persistent, never in files
    lora_fx.unload(gm)
    assert not any("alora" in n for n, _ in gm.named_buffers())
    assert torch.equal(gm(ids), model(ids))


# ---- tiny Llama (torch.export) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids, mask = _ids(256, rows=4, seq=12), torch.ones(4, 12, dtype=torch.long)
    mask[2, :3] = 0  # a left-padded row (without the invocation)
    mask[3, -2:] = 0  # a right-padded row (invocation at 0, offsets count the padding too)
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"attention_mask": mask, "use_cache": False})
    cfg = _cfg(target_modules="all-linear", task_type="CAUSAL_LM")
    pm, gm = peft_and_lora_fx(model, gm, cfg)
    return model, pm, gm, ids, mask


def test_llama_logits_and_gradients_equal_peft(llama):
    model, pm, gm, ids, mask = llama
    lora_fx.set_alora_offsets(gm, ids)
    ours = gm(ids, attention_mask=mask).logits
    theirs = pm(input_ids=ids, attention_mask=mask, use_cache=False).logits  # PEFT computes
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert_differs(theirs, base)
    real = mask.bool()
    assert_close(ours[real], theirs[real])
    for row, start in enumerate([4, 7, 12, 0]):  # the prefix is the base model's, exactly
        assert torch.equal(ours[row, :start], base[row, :start])
    (ours[real].square().mean()).backward()
    (theirs[real].square().mean()).backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert_close(grad, pm.get_parameter(f"base_model.model.{name}").grad)
    gm.zero_grad(), pm.zero_grad()


def test_llama_files_both_ways(llama, tmp_path):
    model, pm, gm, ids, mask = llama
    kw = {"attention_mask": mask}
    pm.save_pretrained(tmp_path / "peft")
    lora_fx.save_adapter(gm, tmp_path / "mine")
    loaded = lora_fx.capture(copy.deepcopy(model), (ids,), {**kw, "use_cache": False})
    lora_fx.load_adapter(loaded, tmp_path / "peft")
    assert loaded.meta["lora_fx"].adapters["default"].config.alora_invocation_tokens == INVOKE
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "mine").eval()
    assert back.peft_config["default"].alora_invocation_tokens == INVOKE
    lora_fx.set_alora_offsets(loaded, ids)
    lora_fx.set_alora_offsets(gm, ids)
    real = mask.bool()
    with torch.no_grad():
        expected = pm(input_ids=ids, **kw, use_cache=False).logits[real]
        assert_close(loaded(ids, **kw).logits[real], expected)
        theirs = back(input_ids=ids, **kw, use_cache=False).logits[real]
        assert_close(theirs, gm(ids, **kw).logits[real])


# ---- refusals ----------------------------------------------------------------------------------


def test_merge_is_refused_like_peft():
    _, pm, gm, ids = _mlp_pair("fx")
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        pm.merge_adapter()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    for call in (lambda: lora_fx.merge(gm), lambda: lora_fx.merge_and_unload(gm)):
        with pytest.raises(MergeError, match="aLoRA"):
            call()
        assert gm.code == code
        assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


@pytest.mark.parametrize(
    ("tokens", "match"),
    [([], "non-empty"), ([7, 1.5], "token ids"), ([True], "token ids"), ("7 9", "token ids")],
)
def test_bad_tokens_are_refused(tokens, match):
    with pytest.raises(ConfigError, match=f"alora_invocation_tokens=.*{match}"):
        LoraConfig(target_modules=["up"], alora_invocation_tokens=tokens)


@pytest.mark.parametrize("tokens", [[], ["7"], 7])
def test_bad_tokens_in_a_file_are_refused(tokens):
    with pytest.raises(ConfigError, match="alora_invocation_tokens"):
        LoraConfig.from_dict({"target_modules": ["up"], "alora_invocation_tokens": tokens})


@pytest.mark.parametrize("other", [{"use_dora": True}, {"velora_config": {"num_groups": 2}}])
def test_one_variant_at_a_time(other):
    with pytest.raises(ConfigError, match="alora_invocation_tokens is not supported with"):
        LoraConfig(target_modules=["up"], alora_invocation_tokens=INVOKE, **other)


def test_embedding_site_is_refused_graph_unchanged():
    torch.manual_seed(0)
    model, ids = _TokenMlp().eval(), _ids()
    with pytest.raises(ValueError, match="alora_invocation_tokens"):  # PEFT refuses too
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**_cfg(target_modules=["emb"])))
    gm = lora_fx.capture(copy.deepcopy(model), (ids,))
    code, keys = gm.code, set(gm.state_dict())
    with pytest.raises(UnsupportedSiteError, match="alora_invocation_tokens.*'emb'"):
        lora_fx.inject(gm, LoraConfig(**_cfg(target_modules=["emb", "up"])))
    assert gm.code == code and set(gm.state_dict()) == keys and "lora_fx" not in gm.meta


def test_set_offsets_errors_change_nothing():
    _, _, gm, ids = _mlp_pair("fx")
    lora_fx.set_alora_offsets(gm, ids)
    before = gm.get_buffer("up.lora_alora_offsets.default").clone()
    for kwargs, err, match in [
        ({"input_ids": ids, "alora_offsets": [1] * 4}, ValueError, "not both"),
        ({"input_ids": ids.float()}, ValueError, "integer tensor"),
        ({"alora_offsets": [1, -2]}, ValueError, "negative"),
        ({"alora_offsets": [1.5]}, ValueError, "ints or None"),
    ]:
        with pytest.raises(err, match=match):
            lora_fx.set_alora_offsets(gm, **kwargs)
        assert torch.equal(gm.get_buffer("up.lora_alora_offsets.default"), before)
    plain = lora_fx.capture(_TokenMlp(), (ids,))
    lora_fx.inject(plain, LoraConfig(target_modules=["up"]))
    with pytest.raises(AdapterError, match="no adapter on this graph has alora_invocation_tokens"):
        lora_fx.set_alora_offsets(plain, ids)


def test_onnx_refuses_alora(tmp_path):
    _, _, gm, ids = _mlp_pair("fx")
    code = gm.code
    for layout in ("inputs", "stacked"):  # "initializers" exports it
        with pytest.raises(UnsupportedSiteError, match="aLoRA"):
            export_onnx(gm, (ids,), tmp_path / "a.onnx", merged=False, lora_layout=layout)
    with pytest.raises(UnsupportedSiteError, match="aLoRA"):
        export_onnx(gm, (ids,), tmp_path / "b.onnx")  # merged: aLoRA does not merge
    assert gm.code == code and lora_fx.active_adapters(gm) == ["default"]


# ---- compile -----------------------------------------------------------------------------------


def test_new_offsets_do_not_recompile():
    model, pm, gm, ids = _mlp_pair("export")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter)
    with torch.no_grad():
        for offsets in ([6, 3, None, 10], [1, 10, 2, None], None):
            if offsets is None:
                lora_fx.set_alora_offsets(compiled, ids)
                offsets = _peft_offsets(pm, ids)
            else:
                lora_fx.set_alora_offsets(compiled, alora_offsets=offsets)
            assert_close(compiled(ids), pm(ids, alora_offsets=offsets))
    assert counter.frame_count == 1


# ---- generation --------------------------------------------------------------------------------


def test_generate_equals_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_causal_lm("llama", vocab=128, intermediate=96).eval()
    cfg = _cfg(target_modules="all-linear", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    with torch.no_grad():  # larger B so the adapter changes the tokens
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    pm.eval().save_pretrained(tmp_path)
    gm = lora_fx.capture_for_generation(base, max_batch_size=4, max_cache_len=40)
    lora_fx.load_adapter(gm, tmp_path)
    ids = _ids(128, rows=3, seq=10)  # invocation at 4, at 7 (last of two), none
    mask = torch.ones_like(ids)
    mask[1, :1] = 0  # left padding
    kw = {"max_new_tokens": 12}
    with torch.no_grad():
        expected = pm.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
        with pm.disable_adapter():
            plain = pm.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    assert not torch.equal(expected, plain)  # the adapter matters
    assert torch.equal(expected[2], plain[2])  # the row without the invocation is the base's
    lora_fx.set_alora_offsets(gm, alora_offsets=[1, 1, 1])
    before = gm.get_buffer("model.layers.0.self_attn.q_proj.lora_alora_offsets.default").clone()
    assert torch.equal(lora_fx.generate(gm, ids, mask, **kw), expected)
    after = gm.get_buffer("model.layers.0.self_attn.q_proj.lora_alora_offsets.default")
    assert torch.equal(after, before)  # the graph's own offsets come back
    compiled = torch.compile(gm, backend="aot_eager")
    assert torch.equal(lora_fx.generate(compiled, ids, mask, **kw), expected)


# ---- mixed batches (PEFT's adapter_names= with aLoRA rows) -------------------------------------

TELL = [11, 12, 13]
MIXED_ROWS = ["ask", "tell", "plain", "__base__", "ask"]


def _mixed_ids(vocab: int, seq: int = 12) -> torch.Tensor:
    """Row 0: ask's tokens at 3; row 1: tell's at 5 (and ask's, ignored); row 2: ask's (plain:
    ignored); row 3: the base; row 4: no invocation (ask: the base model's)."""
    ids = torch.randint(20, vocab, (5, seq), generator=torch.Generator().manual_seed(5))
    for row, start, tokens in ((0, 3, INVOKE), (1, 5, TELL), (1, 1, INVOKE), (2, 2, INVOKE)):
        ids[row, start : start + len(tokens)] = torch.tensor(tokens)
    return ids


def _peft_three(model, targets: list[str], *, plain_bias: bool = False, **extra):
    """PEFT with aLoRA "ask" and "tell" (other tokens, rank and sites) and plain "plain"."""
    cfgs = {
        "ask": {"r": 4, "lora_alpha": 8, "alora_invocation_tokens": INVOKE},
        "tell": {"r": 2, "lora_alpha": 5, "alora_invocation_tokens": TELL},
        "plain": {"r": 3, "lora_alpha": 6, "lora_bias": plain_bias},
    }
    torch.manual_seed(1)
    pm = None
    for name, cfg in cfgs.items():
        sites = targets[:1] if name == "tell" else targets
        config = peft.LoraConfig(target_modules=sites, init_lora_weights=False, **cfg, **extra)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(model), config, name)
        else:
            pm.add_adapter(name, config)
    with torch.no_grad():  # a nonzero B bias (PEFT starts it at zero)
        for name, p in pm.named_parameters():
            if name.endswith("lora_B.plain.bias"):
                p.normal_()
    return pm.eval()


def _loaded(pm, gm, folder):
    """The graph with PEFT's three adapters loaded from its files."""
    pm.save_pretrained(folder)
    for name in ("ask", "tell", "plain"):
        lora_fx.load_adapter(gm, folder / name, name)
    return gm


def _mixed_offsets(pm, ids, rows):
    return calculate_alora_offsets(pm.peft_config, "ask", ids, adapter_names=rows)


def _offset_reads(gm) -> int:
    return sum(n.target == "lora_fx_alora_offsets" for n in gm.graph.nodes)


def test_gathered_linear_masks_rows_by_hand():
    x, index = torch.ones(3, 4, 1), torch.tensor([0, 0, 1])
    a_t, b_t = torch.ones(2, 1, 1), torch.full((2, 1, 1), 2.0)  # slot 1: the zero slot
    b_t[1] = 0
    out = gathered_linear(torch.zeros(3, 4, 1), x, index, a_t, b_t, torch.tensor([2, 99, 0]))
    # row 0 (aLoRA, offset 2): the last 2 positions; row 1 (plain: past the end): all; row 2: 0
    assert out[..., 0].tolist() == [[0, 0, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0]]


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed:UserWarning")
@pytest.mark.filterwarnings("ignore:Adapter 'plain'.*invalid shape:UserWarning")
@pytest.mark.parametrize("masked", [False, True])
def test_mixed_batch_llama_equals_peft(tmp_path, masked):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = _mixed_ids(256)
    kw = {"use_cache": False}
    pm = _peft_three(model, ["q_proj", "v_proj"], plain_bias=masked, task_type="CAUSAL_LM")
    gm = _loaded(pm, lora_fx.capture(copy.deepcopy(model), (ids,), kw), tmp_path)
    assert _mixed_offsets(pm, ids, MIXED_ROWS) == [9, 7, None, None, None]
    lora_fx.set_adapter_batch(gm, MIXED_ROWS)
    lora_fx.set_alora_offsets(gm, ids)
    assert gm.get_buffer("lora_fx_alora_offsets")[[0, 1, 3, 4]].tolist() == [9, 7, 0, 0]
    gm.graph.lint()
    # gathered: one read per site; masked (plain's B bias on q_proj, v_proj, PEFT's test case
    # for a site that cannot gather, as PEFT refuses DoRA in mixed batches): one per aLoRA branch
    # (ask on both, tell on q_proj); two layers
    assert _offset_reads(gm) == 2 * (3 if masked else 2)
    with torch.no_grad():
        ours = gm(ids).logits
        theirs = pm(input_ids=ids, adapter_names=MIXED_ROWS, **kw).logits
        base = model(input_ids=ids, **kw).logits
    for row in (0, 1, 2):
        assert_differs(theirs[row], base[row])
    assert_close(ours, theirs)
    # before the invocation, the base row, a row without it: the base model's, bitwise
    assert torch.equal(ours[0, :3], base[0, :3]) and torch.equal(ours[1, :5], base[1, :5])
    assert torch.equal(ours[3], base[3]) and torch.equal(ours[4], base[4])
    lora_fx.set_adapter_batch(gm, None)
    assert not any("lora_fx_alora" in n for n, _ in gm.named_buffers())
    assert lora_fx.active_adapters(gm) == ["ask"]


def _mlp_three(tmp_path):
    torch.manual_seed(0)
    model = _TokenMlp().eval()
    ids = _mixed_ids(50, seq=10)
    pm = _peft_three(model, ["up", "down"])
    gm = _loaded(pm, lora_fx.capture(copy.deepcopy(model), (ids,), method="fx"), tmp_path)
    return model, pm, gm, ids


def test_mixed_batch_fx_compiles_once_for_new_offsets_and_compositions(tmp_path):
    model, pm, gm, ids = _mlp_three(tmp_path)
    other = ["plain", "tell", "ask", "ask", "__base__"]
    lora_fx.set_adapter_batch(gm, MIXED_ROWS)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(ids)[0], model(ids)[0])  # no offsets yet: aLoRA rows unadapted
        for rows, given in ((MIXED_ROWS, None), (other, None), (other, [3, None, 10, 0, 1])):
            lora_fx.set_adapter_batch(gm, rows)  # the slot index only
            if given is None:
                lora_fx.set_alora_offsets(compiled, ids)
                given = _mixed_offsets(pm, ids, rows)
            else:
                lora_fx.set_alora_offsets(compiled, alora_offsets=given)
            expected = pm(ids, adapter_names=rows, alora_offsets=given)
            assert_differs(expected, model(ids))
            assert_close(compiled(ids), expected)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_mixed_batch_training_gradients_equal_training_alone(tmp_path):
    _, _, gm, ids = _mlp_three(tmp_path)
    offsets = lambda g: lora_fx.set_alora_offsets(g, ids)  # noqa: E731
    assert_batch_grads_equal_alone(gm, ids, MIXED_ROWS, prepare=offsets)
    gm.train()
    lora_fx.set_adapter_batch(gm, MIXED_ROWS)
    assert _offset_reads(gm) == 2  # the in-graph stacks gather with the mask: up and down


def test_alora_adapter_loaded_while_a_batch_is_set(tmp_path):
    model, pm, _, ids = _mlp_three(tmp_path)
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), method="fx")
    lora_fx.load_adapter(gm, tmp_path / "plain", "plain")
    lora_fx.set_adapter_batch(gm, ["plain"] * 5, capacity=3)
    assert _offset_reads(gm) == 0  # no aLoRA adapter: no mask
    lora_fx.load_adapter(gm, tmp_path / "ask", "ask")  # aLoRA sites now: a new graph
    rows = ["ask", "plain", "ask", "__base__", "ask"]
    lora_fx.set_adapter_batch(gm, rows)
    lora_fx.set_alora_offsets(gm, ids)
    with torch.no_grad():
        expected = pm(ids, adapter_names=rows, alora_offsets=_mixed_offsets(pm, ids, rows))
        assert_close(gm(ids), expected)
    assert _offset_reads(gm) == 2


def test_mixed_batch_offsets_errors_change_nothing(tmp_path):
    _, _, gm, ids = _mlp_three(tmp_path)
    lora_fx.set_adapter_batch(gm, MIXED_ROWS)
    lora_fx.set_alora_offsets(gm, ids)
    before = {n: b.clone() for n, b in gm.named_buffers() if "alora" in n}
    for kwargs, match in [
        ({"input_ids": ids[:3]}, "3 rows for a mixed batch of 5 rows"),
        ({"alora_offsets": [1, 2]}, "2 rows for a mixed batch of 5 rows"),
        ({"input_ids": ids, "alora_offsets": [1] * 5}, "not both"),
        ({"alora_offsets": [1, -2, 0, 0, 0]}, "negative"),
    ]:
        with pytest.raises(ValueError, match=match):
            lora_fx.set_alora_offsets(gm, **kwargs)
        assert all(torch.equal(gm.get_buffer(n), b) for n, b in before.items())
    lora_fx.set_alora_offsets(gm)  # cleared: aLoRA rows unadapted, the plain row adapted
    assert gm.get_buffer("lora_fx_alora_offsets").tolist()[:2] == [0, 0]
    assert gm.get_buffer("lora_fx_alora_offsets")[2] >= ids.shape[1]


def test_mixed_batch_generate_equals_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_causal_lm("llama", vocab=128, intermediate=96).eval()
    pm = _peft_three(base, ["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    with torch.no_grad():  # larger B so the adapters change the tokens
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    gm = _loaded(
        pm, lora_fx.capture_for_generation(base, max_batch_size=5, max_cache_len=40), tmp_path
    )
    ids = _mixed_ids(128, seq=10)
    mask = torch.ones_like(ids)
    mask[2, :1] = 0  # left padding
    kw = {"max_new_tokens": 8, "adapter_names": MIXED_ROWS}
    with torch.no_grad():
        expected = pm.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
        with pm.disable_adapter():
            plain = pm.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8
            )
    assert not torch.equal(expected[:3], plain[:3])  # the adapters matter
    assert torch.equal(expected[3:], plain[3:])  # the base row, the row without invocation
    assert torch.equal(lora_fx.generate(gm, ids, mask, **kw), expected)
    assert not any("lora_fx_alora" in n for n, _ in gm.named_buffers())
    compiled = torch.compile(gm, backend="aot_eager")
    assert torch.equal(lora_fx.generate(compiled, ids, mask, **kw), expected)
