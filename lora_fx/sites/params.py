"""Sites for `target_parameters`: parameters read directly by ops rather than through a module.

A parameter path `<module>.<name>` is selected when it equals a `target_parameters` entry or ends
with `.<entry>` (PEFT's rule). Its site:

    kind "param", weight = the parameter path, nodes = every get_attr node reading it
    2-D [out, in]:      in_features = in, out_features = out, experts = 1
    3-D [E, d1, d2]:    in_features = d2, out_features = d1, experts = E   (PEFT's default layout)

Names follow PEFT's nesting: PEFT wraps a module once per targeted parameter, the first parameter
(in the module's registration order) innermost, so with n targeted parameters on `experts` the k-th
is the site `experts` + `.base_layer` * (n - 1 - k). In-memory names and file keys then match
PEFT's.
"""

from __future__ import annotations

import torch
import torch.fx

from lora_fx.core.keys import is_adapter_parameter
from lora_fx.core.state import CAPTURE_META, lora_tag, state_or_none
from lora_fx.errors import NoTargetMatchedError, UnsupportedSiteError
from lora_fx.sites.site import Site

__all__ = ["find_param_sites", "recorded_param_sites"]


def find_param_sites(gm: torch.fx.GraphModule, targets: list[str]) -> list[Site]:
    """The parameter sites `targets` select, in parameter order.

    Raises:
        NoTargetMatchedError: No parameter matches.
        UnsupportedSiteError: A matched parameter is not 2-D / 3-D, or no op reads it directly.
    """
    readers: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and lora_tag(node) is None:
            readers.setdefault(node.target, []).append(node)
    chosen = [p for p in _parameter_order(gm) if _selected(p, targets)]
    if not chosen:
        raise NoTargetMatchedError(
            f"target_parameters={targets!r} matched no parameter; 3-D parameters in this graph: "
            f"{[p for p in _parameter_order(gm) if gm.get_parameter(p).dim() == 3][:6]!r}"
        )
    by_module: dict[str, list[str]] = {}
    for path in chosen:
        by_module.setdefault(path.rpartition(".")[0], []).append(path)
    sites = []
    for path in chosen:
        module = path.rpartition(".")[0]
        siblings = by_module[module]
        fqn = module + ".base_layer" * (len(siblings) - 1 - siblings.index(path))
        shape = tuple(gm.get_parameter(path).shape)
        if len(shape) not in (2, 3):
            raise UnsupportedSiteError(
                f"target_parameters site {fqn!r} ({path}, shape {shape}): only 2-D [out, in] and "
                "3-D [experts, out, in] parameters are supported"
            )
        if not module:
            raise UnsupportedSiteError(
                f"target_parameters entry matched {path!r}, a parameter of the root module; PEFT's "
                "layout puts LoRA modules beside it in its module, so it must live in a submodule"
            )
        nodes = tuple(readers.get(path, ()))
        if not nodes:
            raise UnsupportedSiteError(
                f"target_parameters site {fqn!r}: no op in the graph reads {path!r} directly (a "
                "leaf module call hides it); capture with method='export' or target the module"
            )
        experts, out_f, in_f = (1, *shape) if len(shape) == 2 else shape
        sites.append(
            Site(
                fqn=fqn,
                kind="param",
                nodes=nodes,
                inputs=nodes,
                weight=path,
                bias=None,
                in_features=in_f,
                out_features=out_f,
                experts=experts,
            )
        )
    return sites


def recorded_param_sites(gm: torch.fx.GraphModule) -> dict[str, Site]:
    """Parameter sites of the adapters already on the graph, by name."""
    state = state_or_none(gm)
    if state is None:
        return {}
    sites: dict[str, Site] = {}
    for targets in {tuple(rec.config.target_parameters or ()) for rec in state.adapters.values()}:
        if targets:
            sites.update({s.fqn: s for s in find_param_sites(gm, list(targets))})
    return sites


def _selected(path: str, targets: list[str]) -> bool:
    """PEFT's rule: the full path, or a dotted suffix of it."""
    return path in targets or any(path.endswith(f".{t}") for t in targets)


def _parameter_order(gm: torch.fx.GraphModule) -> list[str]:
    """Base parameter paths in the captured model's registration order (PEFT's nesting order).

    `capture` records the model's order; a graph from elsewhere falls back to gm's own order.
    """
    names = [n for n, _ in gm.named_parameters() if not is_adapter_parameter(n)]
    recorded = gm.meta.get(CAPTURE_META, {}).get("parameters")
    if not recorded:
        return names
    rank = {name: i for i, name in enumerate(recorded)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))
