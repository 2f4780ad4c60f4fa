"""capture_for_generation + generate: token-identical to PeftModel.generate (greedy, seeded sampling),
left-padded batches, adapters switched, merged, per row, hot-swapped, every layout, compiled once."""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_causal_lm, tiny_gpt2
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch._dynamo.testing import CompileCounter

import lora_fx
from lora_fx import GenerationError

NEW = 12
CACHE = 48


def _llama():
    return tiny_causal_lm("llama", vocab=128, intermediate=96)


ARCHS = {
    "llama": _llama,
    "qwen2": lambda: tiny_causal_lm("qwen2", vocab=128, intermediate=96),
    # a window shorter than prompt + new tokens, so the sliding mask matters
    "mistral": lambda: tiny_causal_lm(
        "mistral", vocab=128, intermediate=96, num_key_value_heads=1, sliding_window=8
    ),
    "gpt2": tiny_gpt2,
}


class Pair:
    """A PEFT model with adapters x and y, and the generation graph with the same files loaded."""

    def __init__(self, arch: str, folder) -> None:
        torch.manual_seed(0)
        base = ARCHS[arch]().eval()
        self.peft = get_peft_model(
            copy.deepcopy(base),
            PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
            adapter_name="x",
        )
        self.peft.add_adapter(
            "y",
            PeftLoraConfig(r=2, lora_alpha=6, target_modules="all-linear", init_lora_weights=False),
        )
        with torch.no_grad():  # larger B so adapters change the tokens
            for name, p in self.peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(4.0)
        self.peft.eval()
        self.peft.save_pretrained(folder)
        self.folder = folder
        self.gm = lora_fx.capture_for_generation(base, max_batch_size=4, max_cache_len=CACHE)
        lora_fx.load_adapter(self.gm, folder / "x", adapter_name="x")
        lora_fx.load_adapter(self.gm, folder / "y", adapter_name="y")
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, 128, (3, 9), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[1, :4] = 0  # prompts of 9, 5 and 7 tokens, left-padded
        self.mask[2, :2] = 0

    def use(self, name: str) -> None:
        self.peft.set_adapter(name)
        lora_fx.set_adapter(self.gm, name)

    def hf(self, **kw) -> torch.Tensor:
        with torch.no_grad():
            return self.peft.generate(
                input_ids=self.ids,
                attention_mask=self.mask,
                max_new_tokens=NEW,
                do_sample=False,
                **kw,
            )

    def ours(self, gm=None, **kw) -> torch.Tensor:
        return lora_fx.generate(
            self.gm if gm is None else gm, self.ids, self.mask, max_new_tokens=NEW, **kw
        )


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    return Pair(request.param, tmp_path_factory.mktemp(request.param))


def test_greedy_equals_peft_for_each_adapter(pair):
    outs = {}
    for name in ("x", "y"):
        pair.use(name)
        expected, actual = pair.hf(), pair.ours()
        assert actual.shape == expected.shape == (3, 9 + NEW)
        assert torch.equal(actual, expected)
        outs[name] = actual
    assert not torch.equal(outs["x"], outs["y"])  # the adapters matter


def test_per_row_adapters_equal_peft(pair):
    pair.use("x")
    rows = ["y", "__base__", "x"]
    assert torch.equal(pair.ours(adapter_names=rows), pair.hf(adapter_names=rows))
    assert lora_fx.active_adapters(pair.gm) == ["x"]  # the active adapter comes back


def test_merged_equals_peft(pair):
    pair.use("y")
    expected = pair.hf()
    lora_fx.merge(pair.gm, ["y"])
    try:
        assert torch.equal(pair.ours(), expected)
    finally:
        lora_fx.unmerge(pair.gm)
    assert torch.equal(pair.ours(), expected)


@pytest.mark.parametrize("layout", lora_fx.LAYOUTS)
def test_every_layout_generates_the_same_tokens(pair, layout):
    pair.use("x")
    expected = pair.hf()
    lora_fx.set_layout(pair.gm, layout)
    try:
        assert torch.equal(pair.ours(), expected)
    finally:
        lora_fx.set_layout(pair.gm, "fused")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return Pair("llama", tmp_path_factory.mktemp("llama1"))


def test_seeded_sampling_equals_hf(llama):
    llama.use("x")
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = llama.peft.generate(
            input_ids=llama.ids, attention_mask=llama.mask, max_new_tokens=NEW, **kw
        )
    torch.manual_seed(5)
    assert torch.equal(llama.ours(**kw), expected)
    first = llama.ours(**kw, generator=torch.Generator().manual_seed(3))
    again = llama.ours(**kw, generator=torch.Generator().manual_seed(3))
    other = llama.ours(**kw, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_eos_ends_a_row_and_pads_it_like_hf(llama):
    llama.use("x")
    free = llama.ours()
    eos = int(free[0, 9 + 2])  # row 0's third new token
    expected = llama.hf(eos_token_id=eos, pad_token_id=0)
    actual = llama.ours(eos_token_id=eos, pad_token_id=0)
    assert torch.equal(actual, expected)
    assert (actual[0, 9 + 3 :] == 0).all()


def test_streamer_gets_prompt_then_each_token(llama):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = llama.ours(streamer=rec)
    assert rec.ended and torch.equal(rec.puts[0], llama.ids)
    assert torch.equal(torch.stack(rec.puts[1:], dim=1), out[:, 9:])


def test_compiled_decode_compiles_once_for_any_prompt_length(llama):
    llama.use("x")
    counter = CompileCounter()
    compiled = torch.compile(llama.gm, backend=counter)
    for length in (5, 7, 11):
        ids = torch.randint(3, 128, (2, length))
        expected = lora_fx.generate(llama.gm, ids, max_new_tokens=6)
        assert torch.equal(lora_fx.generate(compiled, ids, max_new_tokens=6), expected)
    assert counter.frame_count == 2  # one prefill graph, one decode graph: no recompiles


def test_hotswap_on_a_compiled_generation_graph(llama, tmp_path):
    gm = lora_fx.capture_for_generation(_llama_like(llama), max_batch_size=4, max_cache_len=CACHE)
    lora_fx.load_adapter(gm, llama.folder / "x", adapter_name="slot")
    lora_fx.prepare_for_hotswap(gm, target_rank=4)
    counter = CompileCounter()
    compiled = torch.compile(gm, backend=counter)
    llama.use("x")
    assert torch.equal(llama.ours(compiled), llama.hf())
    frames = counter.frame_count
    lora_fx.hotswap_adapter(gm, llama.folder / "y", adapter_name="slot")
    llama.use("y")
    assert torch.equal(llama.ours(compiled), llama.hf())
    assert counter.frame_count == frames


def _llama_like(pair: Pair):
    """The base model of `pair` (PEFT's base layers unwrapped into a fresh copy)."""
    return copy.deepcopy(pair.peft).unload().eval()


def test_adapter_trained_on_the_generation_graph_loads_in_peft(llama, tmp_path):
    gm = lora_fx.capture_for_generation(_llama_like(llama), max_batch_size=4, max_cache_len=CACHE)
    cfg = lora_fx.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    lora_fx.inject(gm, cfg)
    lora_fx.save_adapter(gm, tmp_path / "mine")
    from peft import PeftModel

    peft = PeftModel.from_pretrained(_llama_like(llama), tmp_path / "mine").eval()
    with torch.no_grad():
        expected = peft.generate(
            input_ids=llama.ids, attention_mask=llama.mask, max_new_tokens=NEW, do_sample=False
        )
    assert torch.equal(lora_fx.generate(gm, llama.ids, llama.mask, max_new_tokens=NEW), expected)


def test_cache_bytes_equal_the_theory(llama):
    spec = llama.gm.meta["lora_fx_generation"]
    held = sum(b.numel() * b.element_size() for n, b in llama.gm.named_buffers() if "kv_cache" in n)
    # 2 (k, v) x layers x batch x kv_heads x cache length x head_dim x 4 bytes
    assert held == spec.cache_bytes == 2 * 2 * 4 * 2 * CACHE * 16 * 4


# ---- bad input ----


def test_too_long_or_too_wide_is_refused_before_any_work(llama):
    before = [b.clone() for b in llama.gm.buffers()]
    with pytest.raises(
        GenerationError,
        match=r"\(9 tokens\) \+ max_new_tokens \(40\) = 49 .*max_cache_len=48; pass max_new_tokens<=39",
    ):
        lora_fx.generate(llama.gm, llama.ids, llama.mask, max_new_tokens=40)
    with pytest.raises(GenerationError, match="batch of 5 prompts .*max_batch_size=4"):
        lora_fx.generate(llama.gm, torch.ones(5, 3, dtype=torch.long), max_new_tokens=2)
    assert all(torch.equal(a, b) for a, b in zip(before, llama.gm.buffers(), strict=True))


def test_graph_without_cache_points_at_capture_for_generation():
    model = _llama().eval()
    gm = lora_fx.capture(model, (torch.ones(1, 4, dtype=torch.long),), {"use_cache": False})
    with pytest.raises(GenerationError, match="capture_for_generation"):
        lora_fx.generate(gm, torch.ones(1, 4, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"attention_mask": torch.ones(3, 8, dtype=torch.long)}, ValueError, "expected the shape"),
        ({"adapter_names": ["x"]}, GenerationError, "one name per row"),
        ({"adapter_names": ["x", "zz", "y"]}, ValueError, "unknown adapter"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
        ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"do_sample": True, "top_p": 1.5}, ValueError, "top_p must be in"),
    ],
)
def test_bad_arguments_say_what_is_expected(llama, kwargs, error, match):
    kw = {"attention_mask": llama.mask, "max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        lora_fx.generate(llama.gm, llama.ids, **kw)


def test_right_padding_is_refused(llama):
    mask = torch.ones_like(llama.ids)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        lora_fx.generate(llama.gm, llama.ids, mask, max_new_tokens=3)


def test_capture_for_generation_refuses_what_it_cannot_serve():
    with pytest.raises(TypeError, match="causal LM"):
        lora_fx.capture_for_generation(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        lora_fx.capture_for_generation(_llama(), max_cache_len=0)
