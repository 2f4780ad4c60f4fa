"""Trainable tokens (`trainable_token_indices`) against PEFT 0.21.2 as the oracle.

For every case (model x capture method x config), with PEFT's delta and LoRA moved off their init:
1. PEFT's file loads and gives PEFT's outputs; `merge_and_unload` gives PEFT's merged outputs;
2. parameter counts, trainable names and file keys equal PEFT's;
3. one backward pass gives PEFT's gradients, on the delta and the LoRA tensors only;
4. lora_fx's file loads in PEFT with lora_fx's outputs; `unload` restores the base bitwise.
Then the bad inputs, each refused by name before the graph changes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from models import Case, TinyEmbedding, tiny_gpt2, tiny_llama
from torch import nn

import lora_fx
from lora_fx import LoraConfig
from lora_fx.errors import AdapterError, ConfigError, NoTargetMatchedError, UnsupportedSiteError

_NO_CACHE = {"use_cache": False}
_PREFIX = "base_model.model."
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")


def _tied_llama() -> nn.Module:
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _ids(vocab: int):
    """Ids 0..15 (every case's token ids) in a random order."""
    return lambda: torch.randperm(16).reshape(2, 8) % vocab


_CUSTOM = {"target_modules": ["lin0"], "trainable_token_indices": {"emb": [1, 3, 7]}}
_ALONE = {"target_modules": "dummy-target-modules", "trainable_token_indices": {"emb": [2, 5]}}
CASES = [
    *(Case(f"custom-{m}", TinyEmbedding, _ids(100), _CUSTOM, method=m) for m in ("fx", "export")),
    *(Case(f"alone-{m}", TinyEmbedding, _ids(100), _ALONE, method=m) for m in ("fx", "export")),
    Case(
        "llama",
        tiny_llama,
        _ids(256),
        {"target_modules": ["q_proj"], "trainable_token_indices": [1, 3, 5]},
        kwargs=_NO_CACHE,
    ),
    Case(
        "llama-tied",
        _tied_llama,
        _ids(256),
        {"target_modules": ["q_proj", "v_proj"], "trainable_token_indices": [0, 4, 9]},
        kwargs=_NO_CACHE,
    ),
    Case(
        "gpt2-tied",
        tiny_gpt2,
        _ids(256),
        {"target_modules": ["c_attn"], "trainable_token_indices": {"wte": [2, 7]}},
        kwargs=_NO_CACHE,
    ),
]


def _out(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _perturb(model: nn.Module) -> None:
    """Move every trainable tensor off its init (the delta starts as the rows' base values)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn_like(param))


def _grads(model: nn.Module, x: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """Gradients of one loss, by parameter name without `prefix`."""
    model.zero_grad()
    _out(model(x)).square().mean().backward()
    return {
        n.removeprefix(prefix): p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    cache = {}

    def get(case: Case):
        if case.id not in cache:
            torch.manual_seed(0)
            model, x = case.model().eval(), case.inputs()
            pm = peft.get_peft_model(
                copy.deepcopy(model), peft.LoraConfig(**case.cfg, init_lora_weights=False)
            ).eval()
            _perturb(pm)
            folder = tmp_path_factory.mktemp(case.id)
            pm.save_pretrained(folder)
            grads = _grads(pm, x, _PREFIX)
            with torch.no_grad():
                out = _out(pm(x))
                counts = pm.get_nb_trainable_parameters()
                merged = _out(pm.merge_and_unload()(x))
            assert_differs(out, _out(model(x)))
            gm = lora_fx.capture(copy.deepcopy(model), (x,), case.kwargs, method=case.method)
            cache[case.id] = (model, x, gm, folder, out, merged, counts, grads)
        return cache[case.id]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_file_gives_peft_outputs_grads_and_merge(case, oracle, tmp_path):
    model, x, base_gm, folder, out, merged, counts, grads = oracle(case)
    gm = lora_fx.load_adapter(copy.deepcopy(base_gm), folder)
    gm.graph.lint()
    tied = 2 if case.id.endswith("tied") else 1  # the tied output layer reads the same rows
    assert sum(n.target is lora_fx.math.ops.replace_rows for n in gm.graph.nodes) == tied
    with torch.no_grad():
        assert_close(_out(gm(x)), out)
    assert lora_fx.count_parameters(gm) == counts
    ours = _grads(gm, x)
    assert ours.keys() == grads.keys()  # the delta and LoRA tensors, nothing else
    for name, grad in grads.items():
        assert_close(ours[name], grad)

    lora_fx.save_adapter(gm, tmp_path)
    theirs = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    assert set(safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))) == set(
        theirs
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == case.cfg["trainable_token_indices"]

    lora_fx.merge_and_unload(gm)
    assert not [n for n in gm.graph.nodes if "lora_fx" in n.meta]
    assert not [n for n, _ in gm.named_modules() if "token_adapter" in n]
    with torch.no_grad():
        assert_close(_out(gm(x)), merged)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lora_fx_file_loads_in_peft_and_unload_restores(case, oracle, tmp_path):
    model, x, base_gm, *_ = oracle(case)
    gm = copy.deepcopy(base_gm)
    weights = {n: p.detach().clone() for n, p in gm.named_parameters()}
    gm = lora_fx.inject(gm, LoraConfig(**case.cfg, init_lora_weights=False))
    _perturb(gm)
    with torch.no_grad():
        out = _out(gm(x))
    assert_differs(out, _out(model(x)))
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        assert_close(_out(pm(x)), out)

    merged = lora_fx.merge(copy.deepcopy(gm))
    with torch.no_grad():
        assert_close(_out(merged(x)), out)
    tables = ("emb.weight", "wte.weight", "embed_tokens.weight")
    table = next(n for n, _ in merged.named_parameters() if n.endswith(tables))
    lora_fx.unmerge(merged)  # the replaced rows come back bitwise (LoRA: up to rounding)
    assert torch.equal(merged.get_parameter(table), weights[table])

    lora_fx.unload(gm)
    assert dict(gm.named_parameters()).keys() == weights.keys()
    for name, param in gm.named_parameters():
        assert torch.equal(param, weights[name]), name
    assert not [n for n, _ in gm.named_modules() if "token_adapter" in n]
    with torch.no_grad():
        assert_close(_out(gm(x)), _out(model(x)))


def test_training_step_touches_only_the_rows(tmp_path):
    model, x = TinyEmbedding().eval(), torch.randint(0, 100, (2, 8))
    gm = lora_fx.capture(model, (x,), method="fx")
    before = model.emb.weight.detach().clone()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [4]}))
    optimizer = torch.optim.SGD(lora_fx.trainable_parameters(gm).values(), lr=0.5)
    gm.train()
    _out(gm(torch.full((2, 8), 4))).square().mean().backward()
    optimizer.step()
    assert torch.equal(model.emb.weight, before)  # the base table is frozen
    assert model.emb.weight.grad is None
    lora_fx.merge_and_unload(gm)
    changed = (model.emb.weight != before).any(1).nonzero().flatten().tolist()
    assert changed == [4]


# ------------------------------------------------------------------------------- bad input


def _custom_graph(method: str = "fx"):
    model, x = TinyEmbedding().eval(), torch.randint(0, 100, (2, 8))
    return lora_fx.capture(model, (x,), method=method)


def _snapshot(gm: torch.fx.GraphModule):
    return (
        gm.code,
        [n for n, _ in gm.named_modules()],
        [(n, p.requires_grad) for n, p in gm.named_parameters()],
    )


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        ({"emb": [3, 100, 250]}, UnsupportedSiteError, r"ids \[100, 250\] are out of range"),
        ({"embed": [1]}, NoTargetMatchedError, r"key 'embed' names no embedding.*\['emb'\]"),
        ({"lin0": [1]}, NoTargetMatchedError, "key 'lin0' names no embedding"),
        ([1, 2], NoTargetMatchedError, "key 'embed_tokens' names no embedding"),
    ],
    ids=["out_of_range", "no_such_key", "not_an_embedding", "list_without_embed_tokens"],
)
def test_bad_tokens_are_refused_and_leave_the_graph(tokens, error, match):
    gm = _custom_graph()
    before = _snapshot(gm)
    with pytest.raises(error, match=match):
        lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], trainable_token_indices=tokens))
    assert _snapshot(gm) == before


def test_embedding_both_lora_and_tokens_is_refused_after_inlining():
    gm = _custom_graph()  # the fx leaf is opened before the overlap is found: rolled back
    before = _snapshot(gm)
    cfg = LoraConfig(target_modules=["emb"], trainable_token_indices={"emb": [1]})
    with pytest.raises(UnsupportedSiteError, match=r"\['emb'\] are both LoRA targets"):
        lora_fx.inject(gm, cfg)
    assert _snapshot(gm) == before


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        ([1, 2, 1], r"repeats token ids \[1\]"),
        ({"emb": [0, -1]}, r"negative token ids \[-1\]"),
        ({"emb": []}, "selects no token"),
        ({"emb": [1.5]}, "expected a list of token ids"),
        ("1,2", "expected a list of token ids"),
    ],
    ids=["duplicates", "negative", "empty", "float", "string"],
)
def test_bad_token_lists_are_config_errors(tokens, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(target_modules=["lin0"], trainable_token_indices=tokens)


def test_tied_output_with_other_ids():
    model, x = _tied_llama().eval(), torch.randint(0, 256, (2, 8))
    gm = lora_fx.capture(model, (x,), _NO_CACHE)
    tokens = {"embed_tokens": [1, 2], "lm_head": [3]}
    with pytest.raises(ConfigError, match="Cannot ensure weight tying"):
        lora_fx.inject(
            gm,
            LoraConfig(
                target_modules=["q_proj"], trainable_token_indices=tokens, ensure_weight_tying=True
            ),
        )
    with pytest.raises(UnsupportedSiteError, match="tied to 'model.embed_tokens'"):
        lora_fx.inject(gm, LoraConfig(target_modules=["q_proj"], trainable_token_indices=tokens))
    same = {"embed_tokens": [1, 2], "lm_head": [1, 2]}  # PEFT: the lm_head entry is the tie
    lora_fx.inject(gm, LoraConfig(target_modules=["q_proj"], trainable_token_indices=same))
    assert sum(n.target is lora_fx.math.ops.replace_rows for n in gm.graph.nodes) == 2


def test_ensure_weight_tying_without_tied_weights_warns():
    gm = _custom_graph()
    cfg = LoraConfig(
        target_modules=["lin0"], trainable_token_indices={"emb": [1]}, ensure_weight_tying=True
    )
    with pytest.warns(UserWarning, match="does not have tied weights"):
        lora_fx.inject(gm, cfg)


# ------------------------------------------------------------------------------- config fields


def test_megatron_and_runtime_fields_round_trip(tmp_path):
    cfg = LoraConfig(
        target_modules=["lin0"],
        megatron_config={"tensor_model_parallel_size": 2},
        megatron_core="my.megatron.core",
        runtime_config={"ephemeral_gpu_offload": True},
        ensure_weight_tying=True,
    )
    data = cfg.to_dict()
    assert data["megatron_config"] == {"tensor_model_parallel_size": 2}
    assert data["megatron_core"] == "my.megatron.core"
    assert data["ensure_weight_tying"] is True
    assert "runtime_config" not in data  # as PEFT's to_dict: PEFT's loader expects an object
    again = LoraConfig.from_dict(data)
    assert (again.megatron_config, again.megatron_core) == (cfg.megatron_config, "my.megatron.core")
    assert LoraConfig().runtime_config == {"ephemeral_gpu_offload": False}
    assert peft.LoraConfig().megatron_core == LoraConfig().megatron_core

    gm = lora_fx.inject(_custom_graph(), cfg)
    lora_fx.save_adapter(gm, tmp_path)
    loaded = lora_fx.load_adapter(_custom_graph(), tmp_path)
    kept = lora_fx.core.state.get_state(loaded).adapters["default"].config
    assert kept.megatron_config == {"tensor_model_parallel_size": 2}
    assert kept.megatron_core == "my.megatron.core"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"megatron_config": "tp=2"}, "megatron_config='tp=2' is invalid"),
        ({"megatron_core": 3}, "megatron_core=3 is invalid"),
        ({"runtime_config": 1}, "runtime_config=1 is invalid"),
        ({"ensure_weight_tying": "yes"}, "ensure_weight_tying='yes' is invalid"),
        ({"megatron_config": {"tp": 2}, "use_dora": True}, "not supported with megatron_config"),
    ],
)
def test_bad_peft_fields(fields, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(target_modules=["lin0"], **fields)


def test_peft_runtime_config_object_is_accepted():
    runtime = peft.tuners.lora.config.LoraRuntimeConfig(ephemeral_gpu_offload=True)
    assert LoraConfig(runtime_config=runtime).runtime_config == {"ephemeral_gpu_offload": True}


def test_readme_snippet_runs(tmp_path):
    model = TinyEmbedding().eval()
    ids = torch.randint(0, 100, (2, 8))
    gm = lora_fx.capture(model, (ids,))
    cfg = LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0, 1]})
    gm = lora_fx.inject(gm, cfg)
    assert "emb.token_adapter.trainable_tokens_delta.default" in lora_fx.trainable_parameters(gm)
    lora_fx.save_adapter(gm, tmp_path)
    keys = set(safetensors.torch.load_file(str(Path(tmp_path) / "adapter_model.safetensors")))
    assert f"{_PREFIX}emb.token_adapter.trainable_tokens_delta" in keys


def test_passes_without_token_support_refuse_by_name():
    gm = _custom_graph()
    lora_fx.inject(gm, LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [1]}))
    before = _snapshot(gm)
    with pytest.raises(AdapterError, match="add_weighted_adapter does not support"):
        lora_fx.add_weighted_adapter(gm, ["default"], [1.0], "mix", combination_type="linear")
    with pytest.raises(AdapterError, match="prepare_for_hotswap does not support"):
        lora_fx.prepare_for_hotswap(gm, target_rank=16)
    with pytest.raises(AdapterError, match="mixed-batch adapters cannot act on it"):
        lora_fx.set_adapter_batch(gm, ["default", "__base__"])
    assert _snapshot(gm) == before
