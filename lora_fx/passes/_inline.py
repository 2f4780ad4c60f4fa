"""Open a leaf module call into its functional op, so `target_parameters` can reach its weight.

`torch.fx.symbolic_trace` keeps `nn.Linear` / `nn.Embedding` / `nn.Conv*d` as `call_module`
leaves: their parameters are read inside the call, where a weight-read rewrite (`W -> W +
delta`, the `target_parameters` branch) cannot sit. For a targeted parameter of such a leaf the
call is replaced by the same functional call on `get_attr` reads (`F.linear(x, W, b)`, ...),
which computes the same thing; export graphs read parameters this way already. Modules whose
class overrides `forward`, or convs with a padding mode other than zeros, are left alone (the
`target_parameters` check then names the parameter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from lora_fx.core.graph import replace_with_call

__all__ = ["inline_targeted_leaves"]

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def inline_targeted_leaves(gm: torch.fx.GraphModule, targets: Iterable[str] | None) -> bool:
    """Replace leaf calls of modules holding a targeted parameter; True if any was replaced."""
    targets = list(targets or ())
    if not targets:
        return False
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        module = gm.get_submodule(node.target)
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if not any(_selected(f"{node.target}.{n}", targets) for n in names):
            continue
        functional = _functional(module)
        if functional is None:
            continue
        with gm.graph.inserting_before(node):
            reads = {n: gm.graph.get_attr(f"{node.target}.{n}") for n in names}
        replace_with_call(node, *functional(node.args[0], reads))
        changed = True
    if changed:
        gm.recompile()
    return changed


def _functional(module: nn.Module) -> Callable[[Any, dict], tuple[Any, tuple]] | None:
    """`(x, reads) -> (op, args)` of the functional call a module's forward makes, or None."""
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return lambda x, r: (F.linear, (x, r["weight"], r.get("bias")))
    if isinstance(module, nn.Embedding) and cls.forward is nn.Embedding.forward:
        m = module
        return lambda x, r: (
            F.embedding,
            (
                x,
                r["weight"],
                m.padding_idx,
                m.max_norm,
                m.norm_type,
                m.scale_grad_by_freq,
                m.sparse,
            ),
        )
    for conv_cls, op in _CONVS.items():
        if (
            isinstance(module, conv_cls)
            and cls.forward is conv_cls.forward
            and module.padding_mode == "zeros"
        ):
            m = module
            return lambda x, r, op=op: (
                op,
                (x, r["weight"], r.get("bias"), m.stride, m.padding, m.dilation, m.groups),
            )
    return None


def _selected(path: str, targets: list[str]) -> bool:
    """PEFT's `target_parameters` rule: the full path, or a dotted suffix of it."""
    return path in targets or any(path.endswith(f".{t}") for t in targets)
