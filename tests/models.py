"""Tiny models shared by tests, examples and benchmarks (PEFT's test_custom_models.py in spirit)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "TinyBlockStack",
    "TinyConv",
    "TinyEmbedding",
    "TinyMLP",
    "tiny_bert",
    "tiny_gpt2",
    "tiny_llama",
]


class TinyMLP(nn.Module):
    """PEFT's MLP: lin0 -> relu -> drop -> lin1 -> log_softmax."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
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
