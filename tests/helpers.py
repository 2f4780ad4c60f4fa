"""Shared test helpers: graphs built from `models`, lora_fx nodes by role, 'no LoRA left', logs."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from models import SITE_CASES, TinyBlockStack, tiny_llama

import lora_fx
from lora_fx import LoraConfig


def capture_case(case: str, method: str) -> tuple[torch.fx.GraphModule, torch.Tensor, list[str]]:
    """Capture `SITE_CASES[case]` in eval with `method`; return the graph, input and targets."""
    cls, make_x, targets = SITE_CASES[case]
    model, x = cls().eval(), make_x()
    return lora_fx.capture(model, (x,), method=method), x, targets


def injected_graph(flavour: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """An all-linear injected graph with LoRA dropout and random B, and its input ids.

    `flavour` "fx" / "export" captures a TinyBlockStack with that method; "llama" a tiny llama.
    """
    if flavour == "llama":
        model, ids = tiny_llama(layers=2), torch.randint(0, 256, (2, 16))
        gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    else:
        model, ids = TinyBlockStack(), torch.randint(0, 50, (2, 8))
        gm = lora_fx.capture(model, (ids,), method=flavour)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        lora_dropout=0.1,
        init_lora_weights=False,
    )
    return lora_fx.inject(gm, cfg), ids


def lora_roles(gm: torch.fx.GraphModule, adapter: str | None = None) -> Counter:
    """Count lora_fx nodes by role (optionally for one adapter)."""
    roles = Counter()
    for node in gm.graph.nodes:
        tag = node.meta.get("lora_fx")
        if tag and (adapter is None or tag["adapter"] == adapter):
            roles[tag["role"]] += 1
    return roles


def assert_no_lora(gm: torch.fx.GraphModule) -> None:
    """No lora_fx node, parameter, module or state left."""
    gm.graph.lint()
    assert not lora_roles(gm)
    assert not [k for k in gm.state_dict() if ".lora_" in k], "LoRA parameters left behind"
    assert "lora_fx" not in gm.meta


class SeenMessages(logging.Handler):
    """A logging handler that keeps the message of every record it sees, at any level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
