"""Tiny configs of the transformers architectures lora_fx supports end to end (random weights).

`ARCHS[name]` is an `Arch`: a builder of the model (eval, from config, no download), a maker of its
example inputs (`(args, kwargs)`), and the module names a user would target by hand. Sizes are the
smallest each architecture accepts (hidden 32-64, 2 layers, vocab 128), so the whole matrix runs
in minutes on one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ARCHS", "FAST_ARCHS", "Arch"]

_VOCAB = 128
_TEXT = {
    "vocab_size": _VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, feed it and target it."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]
    targets: list[str]
    # configs ("all-linear" / "named") where PEFT's unmerged output misses a LoRA its merge has
    peft_unmerged_is_wrong: tuple[str, ...] = ()


def _model(auto: str, model_type: str, **fields: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = transformers.AutoConfig.for_model(model_type, **fields)
        return getattr(transformers, auto).from_config(config).eval()

    return build


def _ids(length: int = 8, batch: int = 2) -> Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]:
    return lambda: ((torch.randint(3, _VOCAB, (batch, length)),), {})


def _causal(model_type: str, targets: list[str], **fields: Any) -> Arch:
    return Arch(_model("AutoModelForCausalLM", model_type, **{**_TEXT, **fields}), _ids(), targets)


def _encoder(model_type: str, targets: list[str], **fields: Any) -> Arch:
    fields = {**_TEXT, "num_labels": 3, **fields}
    fields.pop("num_key_value_heads")
    return Arch(_model("AutoModelForSequenceClassification", model_type, **fields), _ids(), targets)


def _seq2seq_inputs() -> tuple[tuple[Any, ...], dict[str, Any]]:
    ids = torch.randint(3, _VOCAB, (2, 8))
    return (ids,), {"decoder_input_ids": torch.randint(3, _VOCAB, (2, 6))}


def _whisper_inputs() -> tuple[tuple[Any, ...], dict[str, Any]]:
    features = torch.randn(2, 16, 32)  # [batch, num_mel_bins, 2 * max_source_positions]
    return (features,), {"decoder_input_ids": torch.randint(3, _VOCAB, (2, 6))}


def _pixels(size: int = 16) -> Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]:
    return lambda: ((torch.randn(2, 3, size, size),), {})


def _text_and_pixels() -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (torch.randint(3, _VOCAB, (2, 8)),), {"pixel_values": torch.randn(2, 3, 16, 16)}


_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 8,
}
_CLIP_TEXT = {
    "vocab_size": _VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
}
_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
_ENCODER_DECODER = {  # BART / Whisper field names
    "vocab_size": _VOCAB,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
}

_LLAVA_IMAGE_TOKEN = _VOCAB - 1


def _llava_inputs() -> tuple[tuple[Any, ...], dict[str, Any]]:
    ids = torch.randint(3, _VOCAB - 1, (2, 12))
    ids[:, 1:5] = _LLAVA_IMAGE_TOKEN  # (16 / 8)^2 = 4 patches per image
    return (ids,), {"pixel_values": torch.randn(2, 3, 16, 16)}


ARCHS: dict[str, Arch] = {
    "llama": _causal("llama", ["q_proj", "v_proj"]),
    "mistral": _causal("mistral", ["q_proj", "v_proj"], sliding_window=4),
    "mixtral": _causal("mixtral", ["q_proj", "v_proj"], **_MOE),
    "qwen2": _causal("qwen2", ["q_proj", "v_proj"]),
    "qwen2_moe": _causal(
        "qwen2_moe",
        ["q_proj", "v_proj"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    "qwen3": _causal("qwen3", ["q_proj", "v_proj"], head_dim=8),
    "qwen3_moe": _causal(
        "qwen3_moe",
        ["q_proj", "v_proj"],
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    ),
    "gemma": _causal("gemma", ["q_proj", "v_proj"], head_dim=8),
    "gemma2": _causal("gemma2", ["q_proj", "v_proj"], head_dim=8, sliding_window=4),
    "gemma3_text": _causal("gemma3_text", ["q_proj", "v_proj"], head_dim=8, sliding_window=4),
    "phi": _causal("phi", ["q_proj", "v_proj"]),
    "phi3": _causal("phi3", ["qkv_proj", "o_proj"]),
    "gpt2": _causal("gpt2", ["c_attn", "c_proj"], n_positions=64),
    "gpt_neox": _causal("gpt_neox", ["query_key_value", "dense"]),
    "gptj": _causal("gptj", ["q_proj", "v_proj"], rotary_dim=4),
    "gpt_bigcode": _causal("gpt_bigcode", ["c_attn", "c_proj"], n_positions=64),
    "opt": _causal("opt", ["q_proj", "v_proj"], ffn_dim=64, word_embed_proj_dim=32),
    "bloom": _causal("bloom", ["query_key_value", "dense"]),
    "falcon": _causal("falcon", ["query_key_value", "dense"]),
    "stablelm": _causal("stablelm", ["q_proj", "v_proj"]),
    "cohere": _causal("cohere", ["q_proj", "v_proj"]),
    "olmo": _causal("olmo", ["q_proj", "v_proj"]),
    "olmo2": _causal("olmo2", ["q_proj", "v_proj"]),
    "deepseek_v3": _causal(
        "deepseek_v3",
        ["q_a_proj", "kv_b_proj"],
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        num_key_value_heads=4,  # multi-head latent attention: one K/V head per query head
    ),
    "bert": _encoder("bert", ["query", "value"]),
    "roberta": _encoder("roberta", ["query", "value"]),
    "distilbert": _encoder(
        "distilbert", ["q_lin", "v_lin"], dim=32, hidden_dim=64, n_layers=2, n_heads=4
    ),
    "deberta-v2": _encoder("deberta-v2", ["query_proj", "value_proj"]),
    "modernbert": _encoder("modernbert", ["Wqkv", "Wo"], global_attn_every_n_layers=2),
    "t5": Arch(
        _model(
            "AutoModelForSeq2SeqLM",
            "t5",
            vocab_size=_VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
        ),
        _seq2seq_inputs,
        ["q", "v"],
    ),
    "bart": Arch(
        _model("AutoModelForSeq2SeqLM", "bart", **_ENCODER_DECODER, max_position_embeddings=64),
        _seq2seq_inputs,
        ["q_proj", "v_proj"],
    ),
    "whisper": Arch(
        _model(
            "AutoModelForSpeechSeq2Seq",
            "whisper",
            **_ENCODER_DECODER,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        _whisper_inputs,
        ["q_proj", "v_proj"],
    ),
    "vit": Arch(
        _model("AutoModelForImageClassification", "vit", num_labels=3, **_VISION),
        _pixels(),
        ["q_proj", "v_proj"],
    ),
    "clip": Arch(
        _model(
            "AutoModel", "clip", text_config=_CLIP_TEXT, vision_config=_VISION, projection_dim=16
        ),
        _text_and_pixels,
        ["q_proj", "v_proj"],
    ),
    "siglip": Arch(
        _model("AutoModel", "siglip", text_config=_CLIP_TEXT, vision_config=_VISION),
        _text_and_pixels,
        ["q_proj", "v_proj"],
        # all-linear takes the pooling head's `nn.MultiheadAttention.out_proj`; MHA reads its
        # weight directly, so PEFT's unmerged forward ignores that LoRA and only its merged
        # model applies it. lora_fx applies it unmerged too: compare with PEFT's merged model.
        peft_unmerged_is_wrong=("all-linear",),
    ),
    "llava": Arch(
        _model(
            "AutoModelForImageTextToText",
            "llava",
            text_config={"model_type": "llama", **_TEXT},
            vision_config={"model_type": "clip_vision_model", **_VISION},
            image_token_index=_LLAVA_IMAGE_TOKEN,
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
        ),
        _llava_inputs,
        ["q_proj", "v_proj"],
    ),
}

# The default run: one of each family and every cause of past failures.
FAST_ARCHS = ("llama", "gemma", "gpt2", "falcon", "mixtral", "bert", "bart")
