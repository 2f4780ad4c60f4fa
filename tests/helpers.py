"""Structure checks shared by pass tests: lora_fx nodes by role, and 'no LoRA left'."""

from __future__ import annotations

from collections import Counter

import torch


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
