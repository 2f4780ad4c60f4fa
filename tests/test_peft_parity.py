"""PEFT as the oracle: one model and one config through PEFT and through lora_fx must agree.

For every case (model x capture method x config):
1. PEFT -> lora_fx: an adapter PEFT saved loads into the captured graph and gives PEFT's outputs;
2. `merge_and_unload` gives PEFT's merged outputs and leaves no lora_fx node;
3. trainable / total parameter counts equal `PeftModel.get_nb_trainable_parameters()`;
4. the keys of `adapter_model.safetensors` equal the keys PEFT writes;
5. lora_fx -> PEFT: an adapter lora_fx saved loads with `PeftModel.from_pretrained` and gives
   lora_fx's outputs.
Adapters are created with `init_lora_weights=False`, and every other trainable tensor (biases,
`modules_to_save` copies) is perturbed, so each check fails when a feature is ignored. Each model is
captured once per method and deep-copied per test; the GPT-2 tied-weight tests capture afresh, since
they check what a merge does to Parameters the graph shares with the eager model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from conftest import assert_close, assert_differs
from models import Case, TinyConv, TinyEmbedding, TinyMLP, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lora_fx

_NO_CACHE = {"use_cache": False}
# torch's pytree warns when `copy.deepcopy` rebuilds the LeafSpec of a captured graph's signature.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")


def _features(x: int = 10) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(4, x)


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6)


def _ids(vocab: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, vocab, (2, 8))


def _custom(name, model, inputs, cfg, methods=("export", "fx")) -> list[Case]:
    return [Case(f"{name}-{m}", model, inputs, cfg, method=m) for m in methods]


_MLP_CONFIGS = {
    "list": {"target_modules": ["lin0", "lin1"]},
    "regex": {"target_modules": r"lin\d"},
    "all_linear": {"target_modules": "all-linear"},  # custom model: the last Linear is targeted too
    "exclude": {"target_modules": "all-linear", "exclude_modules": ["lin1"]},
    "bias_all": {"target_modules": ["lin0"], "bias": "all"},
    "bias_lora_only": {"target_modules": ["lin0"], "bias": "lora_only"},
    "rslora": {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, "use_rslora": True},
    "patterns": {
        "target_modules": ["lin0", "lin1"],
        "r": 4,
        "rank_pattern": {"lin0": 2},
        "alpha_pattern": {"lin1": 3},
    },
    "modules_to_save": {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    "dropout": {"target_modules": ["lin0", "lin1"], "lora_dropout": 0.3},
    "lora_bias": {"target_modules": ["lin0", "lin1"], "lora_bias": True},
}

_CONV_TARGETS = ["conv0", "conv1", "lin0"]

CASES = [
    *(
        case
        for name, cfg in _MLP_CONFIGS.items()
        for case in _custom(f"mlp-{name}", TinyMLP, _features(), cfg)
    ),
    *_custom("conv-list", TinyConv, _images, {"target_modules": _CONV_TARGETS, "r": 4}),
    *_custom(
        "conv-patterns",
        TinyConv,
        _images,
        {
            "target_modules": _CONV_TARGETS,
            "r": 4,
            "rank_pattern": {"conv0": 2},
            "lora_dropout": 0.2,
        },
    ),
    *_custom(
        "conv-lora_bias",
        TinyConv,
        _images,
        {"target_modules": ["conv0", "conv1"], "lora_bias": True},
    ),
    *_custom(
        "conv-bias_all", TinyConv, _images, {"target_modules": ["conv0"], "bias": "all"}, ("fx",)
    ),
    *_custom("emb-list", TinyEmbedding, _ids(100), {"target_modules": ["emb", "lin0"], "r": 4}),
    *_custom(
        "emb-modules_to_save",
        TinyEmbedding,
        _ids(100),
        {"target_modules": ["emb"], "modules_to_save": ["lin0"], "use_rslora": True},
    ),
    *(
        Case(f"gpt2-{name}", tiny_gpt2, _ids(256), cfg, kwargs=_NO_CACHE)
        for name, cfg in {
            "list": {"target_modules": ["c_attn", "c_proj"], "r": 4},
            "all_linear": {"target_modules": "all-linear", "r": 4},
            "layers": {
                "target_modules": ["c_attn", "c_fc"],
                "layers_to_transform": [1],
                "layers_pattern": "h",
            },
            "bias_lora_only": {"target_modules": ["c_fc"], "bias": "lora_only", "lora_bias": True},
        }.items()
    ),
    *(
        Case(f"llama-{name}", tiny_llama, _ids(256), cfg, kwargs=_NO_CACHE)
        for name, cfg in {
            "list": {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 16},
            "regex_dropout": {"target_modules": r".*\.(k|o)_proj", "lora_dropout": 0.1},
            "all_linear_exclude": {
                "target_modules": "all-linear",
                "exclude_modules": r".*\.mlp\..*",
                "r": 4,
            },
            "patterns": {
                "target_modules": ["q_proj", "down_proj"],
                "use_rslora": True,
                "rank_pattern": {"down_proj": 2},
                "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32},
            },
            "layers": {"target_modules": ["gate_proj", "up_proj"], "layers_to_transform": [1]},
            # PEFT matches modules_to_save with `endswith`: every RMSNorm ("input_layernorm", ...)
            "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["norm"]},
            "embed_tokens": {"target_modules": ["embed_tokens", "q_proj"], "r": 4},
        }.items()
    ),
    *(
        Case(f"bert-{name}", tiny_bert, _ids(256), cfg)
        for name, cfg in {
            # BertForSequenceClassification has no output embedding: PEFT's all-linear also takes
            # `bert.pooler.dense` and `classifier`.
            "all_linear": {"target_modules": "all-linear", "r": 4},
            "modules_to_save": {
                "target_modules": ["query", "value"],
                "modules_to_save": ["classifier"],
            },
            "bias_all": {"target_modules": ["query", "key", "value"], "bias": "all"},
        }.items()
    ),
]

_IDS = [case.id for case in CASES]


# ------------------------------------------------------------------------------- helpers


def _out(output: Any) -> torch.Tensor:
    """The logits of a transformers output, or the tensor itself."""
    return output.logits if hasattr(output, "logits") else output


def _perturb_trainable(model: nn.Module, skip_lora: bool = True) -> None:
    """Move every trainable non-LoRA tensor (biases, modules_to_save copies) off its base value."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not (skip_lora and ".lora_" in name):
                param.add_(0.1 * torch.randn_like(param))


def _file_keys(folder: Path) -> set[str]:
    return set(safetensors.torch.load_file(str(folder / "adapter_model.safetensors")))


# adapter_config.json fields that decide which tensors exist and how they are scaled
_CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "bias",
    "use_rslora",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
)


def _file_config(folder: Path) -> dict[str, Any]:
    """The fields above; lists compared as sets (PEFT keeps target names in a set)."""
    data = json.loads((folder / "adapter_config.json").read_text())
    return {k: set(v) if isinstance(v, list) else v for k, v in data.items() if k in _CONFIG_FIELDS}


def _lora_nodes(gm: torch.fx.GraphModule) -> list[str]:
    return [n.format_node() for n in gm.graph.nodes if "lora_fx" in n.meta]


@dataclass
class Base:
    """A base model, its input and its capture, built once per model and capture method."""

    model: nn.Module  # untouched: PEFT and the reverse test get deep copies
    x: torch.Tensor
    gm: torch.fx.GraphModule  # captured from a copy of `model`; deep-copy before changing it

    def graph(self) -> torch.fx.GraphModule:
        """A fresh graph: a deep copy of the capture (capturing once keeps the suite fast)."""
        return copy.deepcopy(self.gm)


@dataclass
class Oracle:
    """What PEFT does with one case."""

    base: Base
    base_out: torch.Tensor
    peft: torch.Tensor
    peft_merged: torch.Tensor
    counts: tuple[int, int]
    folder: Path
    loaded: torch.fx.GraphModule | None = None  # shared by the read-only tests; never mutate it


@pytest.fixture(scope="module")
def base() -> Callable[[Case], Base]:
    cache: dict[tuple[str, str], Base] = {}

    def get(case: Case) -> Base:
        key = (case.model.__name__, case.method)
        if key not in cache:
            torch.manual_seed(0)
            model = case.model().eval()
            x = case.inputs()
            gm = lora_fx.capture(copy.deepcopy(model), (x,), case.kwargs, method=case.method)
            cache[key] = Base(model, x, gm)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def oracle(base, tmp_path_factory) -> Callable[[Case], Oracle]:
    cache: dict[str, Oracle] = {}

    def get(case: Case) -> Oracle:
        if case.id not in cache:
            cache[case.id] = _run_peft(base(case), case.cfg, tmp_path_factory.mktemp(case.id))
        return cache[case.id]

    return get


def _run_peft(b: Base, cfg: dict[str, Any], folder: Path) -> Oracle:
    """PEFT's outputs (adapter, then merged), trainable counts and saved adapter for one config."""
    pm = peft.get_peft_model(
        copy.deepcopy(b.model), peft.LoraConfig(**cfg, init_lora_weights=False)
    ).eval()
    _perturb_trainable(pm)
    counts = pm.get_nb_trainable_parameters()
    with torch.no_grad():
        base_out, out = _out(b.model(b.x)), _out(pm(b.x))
        pm.save_pretrained(folder)
        merged = _out(pm.merge_and_unload()(b.x))
    assert_differs(out, base_out)
    assert_close(merged, out)  # PEFT agrees with itself
    return Oracle(b, base_out, out, merged, counts, folder)


def _loaded(oracle: Oracle) -> torch.fx.GraphModule:
    """A fresh base graph with PEFT's adapter loaded."""
    gm = lora_fx.load_adapter(oracle.base.graph(), oracle.folder)
    gm.graph.lint()
    return gm


def _loaded_once(oracle: Oracle) -> torch.fx.GraphModule:
    """`_loaded`, built once per case for the tests that only read the graph."""
    if oracle.loaded is None:
        oracle.loaded = _loaded(oracle)
    return oracle.loaded


# ------------------------------------------------------------------------------- PEFT -> lora_fx


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_peft_adapter_gives_peft_outputs(case, oracle):
    o = oracle(case)
    gm = _loaded_once(o)
    with torch.no_grad():
        assert_close(_out(gm(o.base.x)), o.peft)


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_merge_and_unload_matches_peft(case, oracle):
    o = oracle(case)
    gm = lora_fx.merge_and_unload(_loaded(o))
    assert _lora_nodes(gm) == []
    gm.graph.lint()
    with torch.no_grad():
        assert_close(_out(gm(o.base.x)), o.peft_merged)


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_parameter_counts_match_peft(case, oracle):
    o = oracle(case)
    assert lora_fx.count_parameters(_loaded_once(o)) == o.counts


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_saved_files_match_peft(case, oracle, tmp_path):
    o = oracle(case)
    lora_fx.save_adapter(_loaded_once(o), tmp_path)
    ours, theirs = _file_keys(tmp_path), _file_keys(o.folder)
    # Documented difference: when `embed_tokens`/`lm_head` are targeted by name, PEFT also saves the
    # whole, unchanged base matrix (`save_embedding_layers="auto"`); lora_fx saves only the adapter
    # (load_adapter accepts PEFT's extra key, and PEFT loads ours: test_lora_fx_adapter_loads_into_peft).
    assert theirs - ours == {
        k
        for k in theirs
        if k.endswith(("embed_tokens.base_layer.weight", "lm_head.base_layer.weight"))
    }
    assert ours <= theirs
    # "all-linear" is written as the resolved names: the same sites as PEFT's
    assert _file_config(tmp_path) == _file_config(o.folder)


def test_all_linear_on_bert_keeps_pooler_and_classifier(oracle):
    # BertForSequenceClassification has no output embedding, so PEFT's all-linear excludes nothing;
    # test_saved_files_match_peft[bert-all_linear] checks lora_fx resolves the same names.
    case = next(c for c in CASES if c.id == "bert-all_linear")
    targets = _file_config(oracle(case).folder)["target_modules"]
    assert {"bert.pooler.dense", "classifier"} <= targets
    assert len(targets) == 14  # 2 layers x 6 linears, pooler, classifier


# ------------------------------------------------------------------------------- lora_fx -> PEFT


@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_lora_fx_adapter_loads_into_peft(case, base, tmp_path):
    b = base(case)
    gm = lora_fx.inject(b.graph(), lora_fx.LoraConfig(**case.cfg, init_lora_weights=False))
    _perturb_trainable(gm)
    with torch.no_grad():
        out = _out(gm(b.x))
        assert_differs(out, _out(b.model(b.x)))
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(b.model), tmp_path).eval()
    with torch.no_grad():
        assert_close(_out(pm(b.x)), out)


# ------------------------------------------------------------------------------- GPT-2 tied weights


@pytest.mark.parametrize(
    ("targets", "tied_untouched"),
    [(["wte", "lm_head"], False), (["c_attn", "wte"], True)],
    ids=["wte+lm_head", "c_attn+wte"],
)
def test_gpt2_tied_weight_merge(targets, tied_untouched, tmp_path):
    model = tiny_gpt2().eval()
    x = _ids(256)()
    reference = copy.deepcopy(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    gm = lora_fx.capture(model, (x,), _NO_CACHE)  # shares the tied Parameter with `model`
    gm = lora_fx.inject(gm, lora_fx.LoraConfig(target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        base = _out(reference(x))
        out = _out(gm(x))
    assert_differs(out, base)

    # the unmerged adapter is PEFT's
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    with torch.no_grad():
        assert_close(_out(pm(x)), out)

    # merging the embedding site unties it: a private copy, with a warning
    with pytest.warns(UserWarning, match="private"):
        gm = lora_fx.merge_and_unload(gm)
    assert _lora_nodes(gm) == []
    gm.graph.lint()
    with torch.no_grad():
        assert_close(_out(gm(x)), out)
    if tied_untouched:  # lm_head is no site: the shared tensor it reads keeps the base values
        assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


# ------------------------------------------------------------------------------- dynamic shapes


def test_dynamic_graph_matches_peft_at_two_shapes(tmp_path):
    """inject on a graph captured at [2, 8] with a padding mask; PEFT agrees at other shapes."""
    model = tiny_llama().eval()
    ids, mask = torch.randint(0, 256, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"attention_mask": mask})
    cfg = {"target_modules": "all-linear", "r": 4, "lora_alpha": 8}
    lora_fx.inject(gm, lora_fx.LoraConfig(**cfg, init_lora_weights=False))
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    for shape in [(1, 5), (3, 13)]:
        ids, mask = torch.randint(0, 256, shape), torch.ones(shape, dtype=torch.long)
        mask[-1, : shape[1] // 2] = 0  # left padding
        real = mask.bool()
        with torch.no_grad():
            out = gm(ids, attention_mask=mask).logits
            expected = pm(input_ids=ids, attention_mask=mask).logits
            assert_differs(expected[real], model(ids, attention_mask=mask).logits[real])
        assert_close(out[real], expected[real])
