import pytest
import torch
from conftest import assert_close
from models import TinyBlockStack, TinyConv, TinyEmbedding, TinyMLP, tiny_gpt2, tiny_llama

import lora_fx
from lora_fx import LoraConfig, NoTargetMatchedError, UnsupportedSiteError
from lora_fx.sites import all_sites, find_sites


def _capture(model, x, method="export", kwargs=None):
    return lora_fx.capture(model.eval(), (x,), kwargs, method=method)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_custom_sites_by_kind(method):
    mlp = all_sites(_capture(TinyMLP(), torch.randn(2, 10), method))
    assert {k: (s.kind, s.in_features, s.out_features) for k, s in mlp.items()} == {
        "lin0": ("linear", 10, 20),
        "lin1": ("linear", 20, 2),
    }
    conv = all_sites(_capture(TinyConv(), torch.randn(1, 3, 6, 6), method))
    assert conv["conv0"].kind == "conv"
    assert conv["conv0"].conv.kernel_size == (3, 3) and conv["conv0"].conv.padding == (1, 1)
    emb = all_sites(_capture(TinyEmbedding(), torch.randint(0, 100, (2, 5)), method))
    assert (emb["emb"].kind, emb["emb"].in_features, emb["emb"].out_features) == (
        "embedding",
        100,
        16,
    )


def test_gpt2_conv1d_is_a_transposed_linear_site_and_tied_weights_are_two_sites():
    ids = torch.randint(0, 256, (1, 8))
    sites = all_sites(_capture(tiny_gpt2(), ids, kwargs={"use_cache": False}))
    c_attn = sites["transformer.h.0.attn.c_attn"]
    assert c_attn.nodes[0].target is torch.ops.aten.addmm.default
    assert (c_attn.kind, c_attn.transposed, c_attn.in_features, c_attn.out_features) == (
        "linear",
        True,
        32,
        96,
    )
    assert sites["transformer.wte"].kind == "embedding"
    assert sites["lm_head"].kind == "linear"
    assert sites["transformer.wte"].weight == sites["lm_head"].weight  # one tensor, two sites


def test_llama_site_names_are_peft_module_paths():
    sites = all_sites(
        _capture(tiny_llama(), torch.randint(0, 256, (1, 8)), kwargs={"use_cache": False})
    )
    assert "model.layers.0.self_attn.q_proj" in sites
    assert "model.layers.1.mlp.down_proj" in sites
    assert sites["model.embed_tokens"].kind == "embedding"


def test_all_linear_skips_only_transformers_output_layer():
    gm = _capture(tiny_llama(), torch.randint(0, 256, (1, 8)), kwargs={"use_cache": False})
    names = {s.fqn for s in find_sites(gm, LoraConfig(target_modules="all-linear"))}
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names
    assert len(names) == 14
    custom = _capture(TinyMLP(), torch.randn(2, 10))
    assert {s.fqn for s in find_sites(custom, LoraConfig(target_modules="all-linear"))} == {
        "lin0",
        "lin1",
    }


def test_list_regex_exclude_and_layers():
    gm = _capture(TinyBlockStack(), torch.randint(0, 50, (2, 5)))

    def names(**kw):
        return sorted(s.fqn for s in find_sites(gm, LoraConfig(**kw)))

    assert names(target_modules=["attn"]) == ["layers.0.attn", "layers.1.attn", "layers.2.attn"]
    assert names(target_modules=["0.attn", "head"]) == ["head", "layers.0.attn"]
    assert names(target_modules="layers\\.[12]\\.mlp") == ["layers.1.mlp", "layers.2.mlp"]
    assert names(target_modules=["attn", "mlp"], exclude_modules=["1.mlp"]) == [
        "layers.0.attn",
        "layers.0.mlp",
        "layers.1.attn",
        "layers.2.attn",
        "layers.2.mlp",
    ]
    # Without layers_pattern PEFT's index regex needs a container above `layers` (model.layers.0...).
    with pytest.raises(NoTargetMatchedError):
        names(target_modules=["attn"], layers_to_transform=[0, 2])
    two = names(
        target_modules=["attn"], layers_to_transform=[0, 2], layers_pattern=["blocks", "layers"]
    )
    assert two == ["layers.0.attn", "layers.2.attn"]
    assert names(target_modules=["attn"], layers_to_transform=1, layers_pattern="layers") == [
        "layers.1.attn"
    ]
    assert names(target_modules=["attn", "embed"], modules_to_save=["embed"]) == [
        "layers.0.attn",
        "layers.1.attn",
        "layers.2.attn",
    ]


def test_regex_must_match_the_whole_name():
    gm = _capture(TinyBlockStack(), torch.randint(0, 50, (2, 5)))
    with pytest.raises(NoTargetMatchedError):
        find_sites(gm, LoraConfig(target_modules="mlp"))


def test_no_match_lists_candidates():
    gm = _capture(TinyMLP(), torch.randn(2, 10))
    with pytest.raises(
        NoTargetMatchedError,
        match=r"target_modules=\['q_proj'\] matched no site.*\['lin0', 'lin1'\]",
    ):
        lora_fx.inject(gm, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(NoTargetMatchedError, match=r"target_modules is None; name the sites"):
        lora_fx.inject(gm, LoraConfig())
    assert not any("lora_fx" in n.meta for n in gm.graph.nodes)
    assert "lora_fx" not in gm.meta


def test_exclude_that_matches_nothing_warns():
    gm = _capture(TinyMLP(), torch.randn(2, 10))
    with pytest.warns(UserWarning, match=r"exclude_modules=\['nope'\] matched no site"):
        find_sites(gm, LoraConfig(target_modules=["lin0"], exclude_modules=["nope"]))


class Grouped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, groups=2)

    def forward(self, x):
        return self.conv(x)


def test_grouped_conv_needs_rank_divisible_by_groups():
    gm = _capture(Grouped(), torch.randn(1, 4, 5, 5))
    with pytest.raises(
        UnsupportedSiteError, match=r"site 'conv' is a conv with groups=2; r=3 must be divisible"
    ):
        lora_fx.inject(gm, LoraConfig(r=3, target_modules=["conv"]))
    lora_fx.inject(gm, LoraConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    with pytest.raises(lora_fx.MergeError, match="groups=2; it cannot be merged"):
        lora_fx.merge(gm)


class CalledTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_module_called_twice_is_one_site_with_two_branches(method):
    model = CalledTwice().eval()
    x = torch.randn(3, 6)
    gm = _capture(model, x, method)
    site = all_sites(gm)["lin"]
    assert len(site.nodes) == 2
    lora_fx.inject(
        gm, LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False)
    )
    a, b = gm.lin.lora_A.default.weight, gm.lin.lora_B.default.weight

    def adapted(h):
        return model.lin(h) + 2.0 * (h @ a.T @ b.T)

    expected = adapted(torch.relu(adapted(x))).detach()
    assert_close(gm(x), expected)
    lora_fx.merge(gm)
    assert_close(gm(x), expected)


class _ScaledEmbedding(torch.nn.Embedding):
    """An embedding subclass (as Gemma's and BART's scaled embeddings are)."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


class _TiedByFunction(torch.nn.Module):
    """The embedding's weight is also read by a bare F.linear (a head tied without a module)."""

    def __init__(self):
        super().__init__()
        self.emb = _ScaledEmbedding(30, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, ids):
        h = self.lin(self.emb(ids))
        return torch.nn.functional.linear(h, self.emb.weight)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_name_whose_ops_disagree_fails_only_configs_that_pick_it(method):
    ids = torch.randint(0, 30, (2, 5))
    gm = lora_fx.capture(_TiedByFunction().eval(), (ids,), method=method)
    code = gm.code
    # export: the embedding subclass is a site by type, named by its module path; the head's
    # F.linear on the same weight is named by the weight's path too: one name, two kinds
    assert "emb" not in all_sites(gm)
    with pytest.raises(UnsupportedSiteError, match=r"site 'emb' is reached by ops on different"):
        lora_fx.inject(gm, LoraConfig(target_modules=["emb"]))
    assert gm.code == code
    lora_fx.inject(gm, LoraConfig(target_modules=["lin"], init_lora_weights=False))  # unaffected
    assert set(lora_fx.trainable_parameters(gm)) == {
        "lin.lora_A.default.weight",
        "lin.lora_B.default.weight",
    }
