"""Layer replication (PEFT's `layer_replication`): the standalone pass and its use through inject.

The oracles are a model built with that many real layers (weights copied from the sources) and
PEFT's own `layer_replication`, whose adapter files load both ways.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from collections import Counter

import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from helpers import lora_adds, lora_roles
from models import TinyBlockStack, TinyMLP, tiny_gpt2
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lora_fx
from lora_fx import LoraConfig, ReplicationError, replicate_layers
from lora_fx.sites import all_sites

IDS = torch.tensor([[3, 17, 250, 9, 41, 88, 120, 7]])
LAYOUTS = {  # layout on 5 layers -> new index's original layer (PEFT's order)
    "grow": ([[0, 4], [2, 5]], [0, 1, 2, 3, 2, 3, 4]),
    "reorder": ([[2, 5], [0, 3]], [2, 3, 4, 0, 1, 2]),
    "drop": ([[1, 3]], [1, 2]),
}


def decoder(kind: str, layers: int = 5) -> nn.Module:
    """A tiny Llama / Mistral / Qwen2 causal LM from config (random weights, eval): a fresh copy."""
    return copy.deepcopy(_decoder(kind, layers))


def graph(kind: str = "llama", layers: int = 5) -> torch.fx.GraphModule:
    """The captured `decoder(kind, layers)`: a fresh copy (export runs once per model)."""
    return copy.deepcopy(_graph(kind, layers))


@functools.cache
def _decoder(kind: str, layers: int) -> nn.Module:
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    config = config_cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(layers)
    return model_cls(config).eval()


@functools.cache
def _graph(kind: str, layers: int) -> torch.fx.GraphModule:
    return capture(decoder(kind, layers))


def really_deep(model: nn.Module, source: list[int], prefix: str, n_layers_attr: str) -> nn.Module:
    """The same architecture with len(source) layers, layer p holding layer source[p]'s weights."""
    config = copy.deepcopy(model.config)
    setattr(config, n_layers_attr, len(source))
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[s] for s in source]
    deep = type(model)(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = value
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        for p, s in enumerate(source):
            if s == int(index):
                state[f"{prefix}{p}.{rest}"] = value
    deep.load_state_dict(state)
    return deep


def capture(model: nn.Module) -> torch.fx.GraphModule:
    return lora_fx.capture(model, (IDS,), {"use_cache": False})


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"]


def storage(gm: nn.Module) -> tuple[set[int], int]:
    """Distinct parameter storages and their bytes."""
    ptrs = {}
    for p in gm.parameters():
        ptrs[p.data_ptr()] = p.numel() * p.element_size()
    return set(ptrs), sum(ptrs.values())


_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def peft_lora(layout, **kw) -> PeftLoraConfig:
    return PeftLoraConfig(**_LORA, layer_replication=layout, init_lora_weights=False, **kw)


def fx_lora(layout, **kw) -> LoraConfig:
    return LoraConfig(**_LORA, layer_replication=layout, init_lora_weights=False, **kw)


# ----------------------------------------------------------------- the pass on its own (no LoRA)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("layout", ["grow", "reorder"])
def test_replicated_graph_equals_a_model_with_that_many_layers(kind, layout):
    ranges, source = LAYOUTS[layout]
    model = decoder(kind)
    gm = graph(kind)
    before = logits(gm(IDS))
    assert replicate_layers(gm, ranges) is gm
    gm.graph.lint()
    assert gm.meta["lora_fx_replication"] == {
        "layer_replication": ranges,
        "container": "model.layers",
        "source": source,
    }
    blocks = [
        n for n, _ in gm.named_modules() if n.count(".") == 2 and n.startswith("model.layers")
    ]
    assert blocks == [f"model.layers.{p}" for p in range(len(source))]
    deep = really_deep(model, source, "model.layers.", "num_hidden_layers")
    with torch.no_grad():
        assert_close(logits(gm(IDS)), deep(IDS, use_cache=False).logits)
    assert_differs(logits(gm(IDS)), before)


def _stack_paths(node: torch.fx.Node) -> list[str]:
    if node.op in ("get_attr", "call_module"):
        return [node.target]
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _outside_stack(gm: torch.fx.GraphModule) -> Counter:
    return Counter(
        str(n.target)
        for n in gm.graph.nodes
        if not any(p.startswith("model.layers.") for p in _stack_paths(n))
    )


def test_blocks_are_copied_and_side_inputs_shared():
    gm = graph()
    outside, per_block = _outside_stack(gm), len(gm.graph.nodes) - sum(_outside_stack(gm).values())
    replicate_layers(gm, LAYOUTS["grow"][0])
    # rotary tables, masks, position ids: computed once, read by every copy
    assert _outside_stack(gm) == outside
    assert len(gm.graph.nodes) == sum(outside.values()) + per_block // 5 * 7
    rotary = [n for n in gm.graph.nodes if "rotary_emb" in str(_stack_paths(n))]
    assert max(len(n.users) for n in rotary) == 7  # cos and sin: one reader per block (was 5)


def test_sites_and_module_stack_are_named_by_new_index():
    gm = replicate_layers(graph(), LAYOUTS["grow"][0])
    sites = all_sites(gm)
    assert [f for f in sites if f.endswith("q_proj")] == [
        f"model.layers.{p}.self_attn.q_proj" for p in range(7)
    ]
    assert (
        sites["model.layers.5.self_attn.q_proj"].weight == "model.layers.5.self_attn.q_proj.weight"
    )
    paths = {
        path
        for node in gm.graph.nodes
        for path, _ in (node.meta.get("nn_module_stack") or {}).values()
        if path.startswith("model.layers.")
    }
    assert {p.split(".")[2] for p in paths} == {str(p) for p in range(7)}
    for node in gm.graph.nodes:  # the stack's keys move with its paths
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            assert key.endswith(path)


def test_copies_share_base_storage():
    model = decoder("llama")
    gm = capture(model)
    ptrs, nbytes = storage(gm)
    replicate_layers(gm, LAYOUTS["grow"][0])
    assert storage(gm) == (ptrs, nbytes)  # no base weight was copied
    copy_5 = gm.get_parameter("model.layers.5.self_attn.q_proj.weight")
    assert copy_5 is gm.get_parameter("model.layers.3.self_attn.q_proj.weight")
    assert copy_5 is model.model.layers[3].self_attn.q_proj.weight  # shared with the eager model
    keys = gm.state_dict().keys()
    assert "model.layers.6.mlp.down_proj.weight" in keys  # every new index is in the state dict
    assert "model.layers.7.mlp.down_proj.weight" not in keys


def test_layers_in_no_range_are_dropped_as_peft_does():
    model = decoder("llama")
    gm = replicate_layers(graph(), LAYOUTS["drop"][0])
    _, nbytes = storage(gm)
    assert nbytes < storage(graph())[1]
    deep = really_deep(model, LAYOUTS["drop"][1], "model.layers.", "num_hidden_layers")
    with torch.no_grad():
        assert_close(logits(gm(IDS)), deep(IDS, use_cache=False).logits)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_custom_block_stack(method):
    model = TinyBlockStack(n_layers=3).eval()
    ids = torch.randint(0, 50, (2, 5))
    gm = lora_fx.capture(model, (ids,), method=method)
    replicate_layers(gm, [[0, 3], [1, 2], [1, 3]])
    source = [0, 1, 2, 1, 1, 2]
    deep = TinyBlockStack(n_layers=len(source)).eval()
    deep.embed, deep.head = model.embed, model.head
    for p, s in enumerate(source):
        deep.layers[p] = model.layers[s]
    assert_close(gm(ids), deep(ids))
    assert gm.get_submodule("layers.4.attn").weight is model.layers[1].attn.weight
    if method == "fx":  # the user's own leaf modules are not touched, only shared
        assert gm.get_submodule("layers.4.attn") is not model.layers[1].attn


def test_stack_found_by_structure_not_by_name():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x, scale):
            return x + scale * torch.tanh(self.proj(x))

    class Odd(nn.Module):  # blocks at trunk.stages.N, a side input shared by all, no "layers"
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.trunk = nn.Module()
            self.trunk.stages = nn.ModuleList(Block() for _ in range(3))
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            scale = x.mean() * 0.5
            h = self.inp(x)
            for stage in self.trunk.stages:
                h = stage(h, scale)
            return self.out(h)

    model = Odd().eval()
    x = torch.randn(3, 4)
    gm = lora_fx.capture(model, (x,))
    replicate_layers(gm, [[2, 3], [0, 3]])
    ref = model.out(
        model.trunk.stages[2](
            model.trunk.stages[1](
                model.trunk.stages[0](
                    model.trunk.stages[2](model.inp(x), x.mean() * 0.5), x.mean() * 0.5
                ),
                x.mean() * 0.5,
            ),
            x.mean() * 0.5,
        )
    )
    assert_close(gm(x), ref)
    assert gm.meta["lora_fx_replication"]["container"] == "trunk.stages"


def test_gpt2_stack_which_peft_cannot_find():
    model = tiny_gpt2(layers=3).eval()
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="Could not locate the layers attribute"):
        get_peft_model(
            copy.deepcopy(model),
            PeftLoraConfig(target_modules=["c_attn"], layer_replication=[[0, 3], [1, 3]]),
        )
    gm = replicate_layers(lora_fx.capture(model, (ids,), {"use_cache": False}), [[0, 3], [1, 3]])
    deep = really_deep(model, [0, 1, 2, 1, 2], "transformer.h.", "n_layer")
    with torch.no_grad():
        assert_close(logits(gm(ids)), deep(ids, use_cache=False).logits)


# ------------------------------------------------------------------------ bad input: clear errors


@pytest.mark.parametrize(
    ("ranges", "match"),
    [
        ([], r"layer_replication=\[\] is invalid; expected a non-empty list"),
        ("0-4", r"layer_replication='0-4' is invalid"),
        ([[0, 1, 2]], r"is invalid; expected .* \[start, end\) pairs"),
        ([[0.0, 2]], r"is invalid"),
        ([[True, 2]], r"is invalid"),
        ([[2, 2]], r"range \[2, 2\) is empty; stack 'model.layers' has 5 blocks"),
        ([[3, 1]], r"range \[3, 1\) is empty"),
        ([[0, 4], [2, 6]], r"range \[2, 6\) is out of bounds; .* 0 <= start < end <= 5"),
        ([[-1, 2]], r"range \[-1, 2\) is out of bounds"),
    ],
)
def test_bad_ranges_raise_and_leave_graph_unchanged(ranges, match):
    gm = graph()
    code, modules = gm.code, [n for n, _ in gm.named_modules()]
    with pytest.raises(ReplicationError, match=match):
        replicate_layers(gm, ranges)
    assert gm.code == code and [n for n, _ in gm.named_modules()] == modules
    assert "lora_fx_replication" not in gm.meta


def test_graph_without_repeated_blocks():
    gm = lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),))
    code = gm.code
    with pytest.raises(ReplicationError, match=r"needs a stack of repeated blocks.* none") as info:
        replicate_layers(gm, [[0, 1]])
    assert isinstance(info.value, lora_fx.ConfigError) and isinstance(info.value, ValueError)
    assert gm.code == code


class _Mlp(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = act

    def forward(self, x):
        return self.act(self.lin(x))


def test_two_stacks_need_a_container():
    class TwoStacks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList(_Mlp(torch.relu) for _ in range(2))
            self.decoder = nn.ModuleList(_Mlp(torch.sigmoid) for _ in range(3))

        def forward(self, x):
            for layer in [*self.encoder, *self.decoder]:
                x = layer(x)
            return x

    model = TwoStacks().eval()
    x = torch.randn(2, 8)
    gm = lora_fx.capture(model, (x,))
    with pytest.raises(ReplicationError, match=r"several block stacks \['decoder', 'encoder'\]"):
        replicate_layers(gm, [[0, 2]])
    with pytest.raises(ReplicationError, match=r"container='dec' has no numbered blocks"):
        replicate_layers(gm, [[0, 2]], container="dec")
    replicate_layers(gm, [[0, 3], [2, 3]], container="decoder")
    h = model.encoder[1](model.encoder[0](x))
    for s in [0, 1, 2, 2]:
        h = model.decoder[s](h)
    assert_close(gm(x), h)


def test_blocks_that_are_not_a_chain():
    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, extra=None):
            return self.lin(x) if extra is None else self.lin(x + extra)

    class Skips(nn.Module):  # block 2 reads block 0's output: not a chain
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Mix() for _ in range(3))

        def forward(self, x):
            a = self.layers[0](x)
            return self.layers[2](self.layers[1](a), a)

    gm = lora_fx.capture(Skips().eval(), (torch.randn(2, 8),))
    code = gm.code
    with pytest.raises(
        ReplicationError, match=r"do not form a chain \(block 2 reads \w+ of block 0"
    ):
        replicate_layers(gm, [[0, 3], [1, 2]])
    assert gm.code == code


def test_same_ranges_twice_is_a_no_op_and_other_ranges_are_refused():
    gm = replicate_layers(graph(), [[0, 4], [2, 5]])
    code = gm.code
    assert replicate_layers(gm, ((0, 4), (2, 5))) is gm and gm.code == code
    with pytest.raises(ReplicationError, match=r"already replicated with \[\[0, 4\], \[2, 5\]\]"):
        replicate_layers(gm, [[0, 2]])


def test_refused_after_an_adapter_was_injected():
    gm = lora_fx.inject(graph(), LoraConfig(target_modules=["q_proj"]))
    code = gm.code
    with pytest.raises(
        ReplicationError,
        match=r"must come before the first adapter, and this graph already holds \['default'\]",
    ):
        replicate_layers(gm, [[0, 4], [2, 5]])
    assert gm.code == code


# --------------------------------------------------- through inject (LoraConfig.layer_replication)


def test_inject_replicates_and_each_copy_gets_its_own_lora():
    model = decoder("llama")
    ranges, source = LAYOUTS["grow"]
    gm = graph()
    ptrs, nbytes = storage(gm)
    lora_fx.inject(gm, fx_lora(ranges))
    pm = get_peft_model(copy.deepcopy(model), peft_lora(ranges))
    a2 = gm.get_parameter("model.layers.2.self_attn.q_proj.lora_A.default.weight")
    a4 = gm.get_parameter("model.layers.4.self_attn.q_proj.lora_A.default.weight")
    assert a2 is not a4 and a2.data_ptr() != a4.data_ptr()
    assert set(lora_fx.trainable_parameters(gm)) == {
        n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad
    }
    lora = sum(p.numel() * p.element_size() for p in lora_fx.trainable_parameters(gm).values())
    new_ptrs, new_bytes = storage(gm)
    assert new_bytes == nbytes + lora  # base: no extra byte; LoRA: one A/B per copy
    assert ptrs <= new_ptrs
    assert lora_adds(gm) == 3 * len(source)


def test_a_rejected_inject_leaves_the_graph_unreplicated():
    gm = graph()
    code = gm.code
    with pytest.raises(lora_fx.NoTargetMatchedError):
        lora_fx.inject(gm, LoraConfig(target_modules=["nope"], layer_replication=[[0, 4], [2, 5]]))
    assert gm.code == code and "lora_fx_replication" not in gm.meta
    with pytest.raises(ReplicationError, match=r"needs a stack of repeated blocks"):
        lora_fx.inject(
            lora_fx.capture(TinyMLP().eval(), (torch.randn(2, 10),)),
            LoraConfig(target_modules=["lin0"], layer_replication=[[0, 1]]),
        )


def test_inits_that_rewrite_base_weights_are_refused():
    # PiSSA / OLoRA / LoftQ write a residual into the base weight, which the copies share
    gm = graph()
    code = gm.code
    cfg = dataclasses.replace(fx_lora(LAYOUTS["grow"][0]), init_lora_weights="pissa")
    with pytest.raises(lora_fx.ConfigError, match=r"init_lora_weights='pissa' rewrites base"):
        lora_fx.inject(gm, cfg)
    assert gm.code == code


def test_inject_after_replicate_layers_does_not_replicate_twice():
    gm = replicate_layers(graph(), LAYOUTS["grow"][0])
    lora_fx.inject(gm, fx_lora(LAYOUTS["grow"][0]))
    lora_fx.inject(gm, fx_lora(LAYOUTS["grow"][0]), adapter_name="other")
    assert len(gm.get_submodule("model.layers")._modules) == 7


@pytest.mark.parametrize(
    ("kind", "layout"),
    [
        ("llama", "grow"),
        ("llama", "reorder"),
        ("llama", "drop"),
        ("mistral", "grow"),
        ("qwen2", "reorder"),
    ],
)
def test_peft_adapter_loads_and_gives_peft_outputs(tmp_path, kind, layout):
    ranges, _ = LAYOUTS[layout]
    model = decoder(kind)
    pm = get_peft_model(copy.deepcopy(model), peft_lora(ranges)).eval()
    _fix_layer_types(pm, LAYOUTS[layout][1])
    pm.save_pretrained(tmp_path)
    gm = lora_fx.load_adapter(graph(kind), tmp_path)
    base = replicate_layers(graph(kind), ranges)
    with torch.no_grad():
        expected = pm(input_ids=IDS, use_cache=False).logits
        assert_differs(logits(gm(IDS)), logits(base(IDS)))
        assert_close(logits(gm(IDS)), expected)


def _fix_layer_types(pm, source: list[int]) -> None:
    """Work around PEFT: it sets num_hidden_layers but not layer_types.

    Qwen2 then indexes layer_types past its end when the stack grows (IndexError in its forward).
    Give each copy its source's type, as lora_fx's graph does.
    """
    config = pm.get_base_model().config
    if getattr(config, "layer_types", None) and len(config.layer_types) < len(source):
        config.layer_types = [config.layer_types[s] for s in source]


@pytest.mark.parametrize(("kind", "layout"), [("llama", "grow"), ("qwen2", "drop")])
def test_saved_adapter_loads_into_peft(tmp_path, kind, layout):
    ranges, _ = LAYOUTS[layout]
    model = decoder(kind)
    gm = lora_fx.inject(graph(kind), fx_lora(ranges))
    lora_fx.save_adapter(gm, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(input_ids=IDS, use_cache=False).logits, logits(gm(IDS)))
    # and back into lora_fx: a round trip
    again = lora_fx.load_adapter(graph(kind), tmp_path / "ours")
    assert_close(logits(again(IDS)), logits(gm(IDS)))


def test_ranges_applied_by_replicate_layers_are_saved_for_peft(tmp_path):
    ranges = LAYOUTS["grow"][0]
    gm = lora_fx.inject(replicate_layers(graph(), ranges), fx_lora(None))
    lora_fx.save_adapter(gm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layer_replication"] == ranges
    back = PeftModel.from_pretrained(decoder("llama"), tmp_path).eval()
    with torch.no_grad():
        assert_close(back(input_ids=IDS, use_cache=False).logits, logits(gm(IDS)))


def test_peft_cannot_grow_qwen2_which_lora_fx_can():
    model = decoder("qwen2")
    pm = get_peft_model(copy.deepcopy(model), peft_lora(LAYOUTS["grow"][0])).eval()
    with pytest.raises(IndexError):  # PEFT: num_hidden_layers grows, layer_types does not
        pm(input_ids=IDS, use_cache=False)
    gm = lora_fx.inject(graph("qwen2"), fx_lora(LAYOUTS["grow"][0]))
    assert logits(gm(IDS)).isfinite().all()


def test_a_mismatched_adapter_file_leaves_the_graph_unreplicated(tmp_path):
    model = decoder("llama")
    get_peft_model(copy.deepcopy(model), peft_lora([[0, 4], [2, 5]])).save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(file)
    del tensors["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"]
    safetensors.torch.save_file(tensors, file)
    gm = graph()
    code = gm.code
    with pytest.raises(lora_fx.AdapterError, match=r"missing 1 tensors.*layers\.5\.self_attn"):
        lora_fx.load_adapter(gm, tmp_path)
    assert gm.code == code and "lora_fx_replication" not in gm.meta
    assert len(gm.get_submodule("model.layers")._modules) == 5


def test_merge_is_exact_on_replicated_layers_where_peft_is_not():
    model = decoder("llama")
    ranges, _ = LAYOUTS["grow"]
    gm = lora_fx.inject(graph(), fx_lora(ranges))
    base = replicate_layers(graph(), ranges)
    with torch.no_grad():
        unmerged = logits(gm(IDS))
        assert_differs(unmerged, logits(base(IDS)))
        # every copy after the first of a layer gets a private weight; the warning says the cost
        with pytest.warns(UserWarning) as caught:
            lora_fx.merge(gm)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 6  # q, v, down of layers 2 and 3, which appear twice
        assert re.fullmatch(
            r"site 'model.layers.2.self_attn.q_proj' shares its weight with "
            r"\['model[._]layers[._]4[._]self_attn[._]q_proj[._]weight'\]; merging gives it a "
            r"private copy \(16,384 bytes\) so the other users keep the base weight",
            messages[0],
        )
        assert lora_roles(gm)["add"] == 0
        assert_close(logits(gm(IDS)), unmerged)
        lora_fx.unmerge(gm)
        assert_close(logits(gm(IDS)), unmerged)
        lora_fx.merge_and_unload(gm)  # the private copies stay after unmerge: no new one
        assert_close(logits(gm(IDS)), unmerged)
        assert not lora_roles(gm)
        # PEFT, for information: the shared weight takes every copy's delta (~0.2 off)
        pm = get_peft_model(copy.deepcopy(model), peft_lora(ranges)).eval()
        lora_fx.load_adapter(gm2 := graph(), _saved(pm))
        reference = pm(input_ids=IDS, use_cache=False).logits
        assert_close(logits(gm2(IDS)), reference)
        peft_merged = pm.merge_and_unload()(input_ids=IDS, use_cache=False).logits
        assert (peft_merged - reference).abs().max() > 0.05


def _saved(pm) -> str:
    import tempfile

    folder = tempfile.mkdtemp()
    pm.save_pretrained(folder)
    return folder


def test_merge_costs_only_the_copies_that_are_merged():
    gm = lora_fx.inject(graph(), fx_lora(LAYOUTS["grow"][0]))
    _, before = storage(gm)
    with pytest.warns(UserWarning):
        lora_fx.merge(gm)
    _, after = storage(gm)
    # layers 2 and 3 appear twice: their q/v/down weights need one private copy each
    per_layer = sum(
        gm.get_parameter(f"model.layers.2.{p}.weight").numel() * 4
        for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert after - before == 2 * per_layer


@pytest.mark.parametrize("method", ["export", "fx"])
def test_merge_unties_one_weight_per_extra_use(method):
    # fx graphs call modules: needs the merge.py fix that drops an untied site from the readers
    model = TinyBlockStack(n_layers=3).eval()
    ids = torch.randint(0, 50, (2, 5))
    gm = lora_fx.capture(model, (ids,), method=method)
    cfg = LoraConfig(target_modules=["attn", "mlp"], layer_replication=[[0, 3], [1, 3]])
    lora_fx.inject(gm, dataclasses.replace(cfg, init_lora_weights=False))
    unmerged = gm(ids)

    def held() -> int:  # bytes of every weight alive: the graph's and the eager model's
        tensors = {p.data_ptr(): p for m in (gm, model) for p in m.parameters()}
        return sum(p.numel() * p.element_size() for p in tensors.values())

    before = held()
    with pytest.warns(UserWarning, match=r"private copy \(1,024 bytes\)"):
        lora_fx.merge(gm)
    assert_close(gm(ids), unmerged)
    assert held() - before == 4 * 1024  # layers 1 and 2 appear twice: attn and mlp, once each


def test_unload_returns_the_replicated_base_graph():
    ranges, source = LAYOUTS["grow"]
    gm = lora_fx.inject(graph(), fx_lora(ranges))
    base = replicate_layers(graph(), ranges)
    lora_fx.unload(gm)
    assert not lora_roles(gm)
    assert len(gm.get_submodule("model.layers")._modules) == len(source)
    assert torch.equal(logits(gm(IDS)), logits(base(IDS)))
    assert gm.get_parameter("model.layers.4.self_attn.q_proj.weight") is gm.get_parameter(
        "model.layers.2.self_attn.q_proj.weight"
    )


def test_training_under_compile_reaches_each_copy_separately():
    gm = lora_fx.inject(graph("llama", 3), fx_lora([[0, 3], [1, 2]]))  # layers 0, 1, 2, 1
    gm.train()
    eager = copy.deepcopy(gm)
    compiled = torch.compile(gm, backend="aot_eager")
    logits(compiled(IDS)).square().mean().backward()
    logits(eager(IDS)).square().mean().backward()
    params = lora_fx.trainable_parameters(gm)
    eager_params = lora_fx.trainable_parameters(eager)
    assert len(params) == 4 * 3 * 2  # 4 layers x (q, v, down) x (A, B)
    for name, param in params.items():
        assert param.grad is not None, name
        assert_close(param.grad, eager_params[name].grad)
    first = params["model.layers.1.self_attn.q_proj.lora_B.default.weight"]
    again = params["model.layers.3.self_attn.q_proj.lora_B.default.weight"]  # same base layer
    assert first.grad.abs().sum() > 0 and again.grad.abs().sum() > 0
    assert_differs(first.grad, again.grad, min_diff=1e-6)
    assert all(p.grad is None for n, p in gm.named_parameters() if n not in params)
    before = first.detach().clone(), again.detach().clone()
    torch.optim.SGD(params.values(), lr=0.1).step()
    assert not torch.equal(first.detach(), before[0]) and not torch.equal(again.detach(), before[1])
    with torch.no_grad():
        assert_close(
            logits(compiled(IDS)), logits(gm(IDS))
        )  # the step is seen by the compiled graph
