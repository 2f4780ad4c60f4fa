"""Tiny models shared by tests, examples and benchmarks (PEFT's test_custom_models.py in spirit)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "METHODS",
    "SITE_CASES",
    "Case",
    "SiteCase",
    "TinyBlockStack",
    "TinyConv",
    "TinyEmbedding",
    "TinyMLP",
    "TinyMha",
    "TinyMoE",
    "bnb_copy",
    "tiny_bert",
    "tiny_causal_lm",
    "tiny_diffusers",
    "tiny_gpt2",
    "tiny_llama",
]


class TinyMLP(nn.Module):
    """PEFT's MLP: lin0 -> relu -> drop -> lin1 -> log_softmax; `features`: in, hidden, out."""

    def __init__(self, bias: bool = True, *, features: tuple[int, int, int] = (10, 20, 2)) -> None:
        super().__init__()
        self.lin0 = nn.Linear(features[0], features[1], bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(features[1], features[2], bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x)))))


class TinyConv(nn.Module):
    """Conv2d (3x3, padding) -> grouped-free conv1x1 -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 4, 1)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv1(self.relu(self.conv0(x))))
        return self.lin0(h.flatten(1))


class TinyConv1d(nn.Module):
    """Conv1d (k 3, stride 2, padding 1) -> conv1d k1 -> flatten -> linear.

    No dilation: PEFT's `lora_A` drops the base conv's dilation (peft 0.21.2), so its output
    would not match the base conv's shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(3, 8, 3, stride=2, padding=1)
        self.conv1 = nn.Conv1d(8, 4, 1)
        self.lin0 = nn.Linear(4 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class TinyEmbedding(nn.Module):
    """Embedding -> mean over tokens -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.lin0 = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.emb(ids).mean(1))


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(torch.relu(self.attn(self.norm(x))))


class TinyBlockStack(nn.Module):
    """Embedding -> N residual blocks (`layers.i`) -> head: a decoder-like custom stack."""

    def __init__(self, vocab: int = 50, dim: int = 16, n_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_Block(dim) for _ in range(n_layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class _Experts(nn.Module):
    """Stacked expert weights used directly in `bmm`, as transformers' MoE experts store them."""

    def __init__(self, experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, dim, 2 * hidden) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [E, T, dim]
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(nn.functional.silu(gate) * up, self.down_proj)


class TinyMha(nn.Module):
    """PEFT's ModelMha: `nn.MultiheadAttention(10, 2)` self-attention -> lin0 -> log_softmax."""

    def __init__(self, batch_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2, batch_first=batch_first, bias=bias)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.mha(x, x, x)
        return self.sm(self.lin0(x))


class TinyMoE(nn.Module):
    """Router -> every expert on every token (bmm on [E, in, out] weights) -> weighted sum."""

    def __init__(self, experts: int = 4, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = _Experts(experts, dim, hidden)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, dim]
        weights = self.router(x).softmax(-1)  # [T, E]
        per_expert = self.experts(x.unsqueeze(0).expand(weights.shape[1], -1, -1))  # [E, T, dim]
        return self.head(torch.einsum("te,etd->td", weights, per_expert))


def bnb_copy(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    compress_statistics: bool = True,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """A deep copy whose nn.Linear layers are bitsandbytes ones holding the same weights, in eval.

    `quant_type` "nf4" / "fp4" gives `Linear4bit` (compute dtype = the weight's), "int8"
    `Linear8bitLt` (threshold 0). Sets `is_loaded_in_4bit` / `_8bit` as transformers does, so
    PEFT dispatches its bitsandbytes LoRA layers.
    """
    import copy

    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            w, has_bias = child.weight.data.clone(), child.bias is not None
            if quant_type == "int8":
                new = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=has_bias, has_fp16_weights=False
                )
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=has_bias,
                    compute_dtype=w.dtype,
                    compress_statistics=compress_statistics,
                    quant_type=quant_type,
                )
                new.weight = bnb.nn.Params4bit(
                    w,
                    requires_grad=False,
                    compress_statistics=compress_statistics,
                    quant_type=quant_type,
                )
            if has_bias:
                new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, name, new.to(w.device))
    if quant_type == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model.eval()


def tiny_llama(layers: int = 2, hidden: int = 64):
    """A LlamaForCausalLM from config with random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def tiny_causal_lm(arch: str, *, vocab: int = 256, intermediate: int = 128, **config: Any):
    """A Llama / Qwen2 / Mistral causal LM from config: 2 layers, hidden 64, 4 heads (2 for K/V).

    `config` overrides or adds config fields (e.g. `num_key_value_heads=1, sliding_window=8`).
    """
    import transformers

    names = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[arch]
    fields = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": intermediate,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        **config,
    }
    model_class = getattr(transformers, f"{names}ForCausalLM")
    return model_class(getattr(transformers, f"{names}Config")(**fields))


def tiny_gpt2(layers: int = 2):
    """A GPT2LMHeadModel (Conv1D layers, tied wte/lm_head) from config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_embd=32,
        n_layer=layers,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_bert(layers: int = 2):
    """A BertForSequenceClassification from config."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


METHODS = ("fx", "export")  # lora_fx.capture methods every custom model is tested with


def tiny_diffusers(name: str) -> tuple[nn.Module, tuple, dict]:
    """A diffusers model from a tiny config (random weights, eval) with example (args, kwargs).

    `name`: "unet" (UNet2DConditionModel), "vae" (AutoencoderKL, full forward), "sd3"
    (SD3Transformer2DModel) or "flux" (FluxTransformer2DModel). diffusers is imported here, so
    tests that never build one do not pay for the import.
    """
    import diffusers

    if name == "unet":
        model = diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(32,), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
        )  # fmt: skip
        args = (torch.randn(2, 4, 8, 8), torch.tensor(3), torch.randn(2, 5, 32))
        return model.eval(), args, {}
    if name == "vae":
        model = diffusers.AutoencoderKL(
            block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=16,
        )  # fmt: skip
        return model.eval(), (torch.randn(1, 3, 16, 16),), {}
    if name == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
            caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16,
        )  # fmt: skip
        args = (
            torch.randn(1, 4, 8, 8),
            torch.randn(1, 5, 16),
            torch.randn(1, 8),
            torch.tensor([3.0]),
        )
        return model.eval(), args, {}
    if name == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
            guidance_embeds=False, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
        kwargs = {
            "hidden_states": torch.randn(1, 16, 4),
            "encoder_hidden_states": torch.randn(1, 5, 16),
            "pooled_projections": torch.randn(1, 8),
            "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(5, 3),
        }
        return model.eval(), (), kwargs
    raise ValueError(f"unknown diffusers model {name!r}; choose unet, vae, sd3 or flux")


class SiteCase(NamedTuple):
    """A tiny model, a maker of its example input, and targets covering every site it has."""

    model: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]
    targets: list[str]


# One model per site kind (linear; conv2d; embedding), shared by the inject / merge / unload tests,
# which parametrize over `SITE_CASES` x `METHODS`.
SITE_CASES = {
    "mlp": SiteCase(TinyMLP, lambda: torch.randn(4, 10), ["lin0", "lin1"]),
    "conv": SiteCase(TinyConv, lambda: torch.randn(2, 3, 6, 6), ["conv0", "conv1", "lin0"]),
    "embedding": SiteCase(TinyEmbedding, lambda: torch.randint(0, 100, (2, 5)), ["emb", "lin0"]),
}


@dataclass(frozen=True)
class Case:
    """One model, capture method and LoRA config (PEFT names, no `init_lora_weights`) for PEFT."""

    id: str
    model: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    cfg: dict[str, Any]
    method: str = "export"
    kwargs: dict[str, Any] | None = None


def save_tiny_tokenizer(folder, vocab_size: int = 256) -> None:
    """A word-level fast tokenizer (`<unk>`, `<s>`, `</s>`, then `t3`, `t4`, ...) saved in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
