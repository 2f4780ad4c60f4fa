"""Quantize the base linears of a captured graph with bitsandbytes (QLoRA), and undo it.

    quantize:    y = linear(x, W[out, in], b)   ->   y = quant.linear_4bit(x, W4[out, in], b)
                 y = addmm(b, x, W[in, out])    ->   the same, W transposed to [out, in] first
                 y = Linear(x)  (call_module)   ->   the same
    dequantize:  y = quant.linear_4bit(x, W4, b) ->  y = linear(x, deQ(W4), b)
                 y = Linear4bit(x) (call_module) ->  y = Linear(x)  (a plain nn.Linear)

`torch.export` cannot trace bitsandbytes' `Linear4bit`, and transformers models cannot be
`symbolic_trace`d; so capture the model in full precision and quantize the graph. `W4` is a
bitsandbytes `Params4bit` (NF4 / FP4, 64-weight blocks, optionally double-quantized absmax) or an
`Int8Params`, bit for bit what `bnb.nn.Linear4bit` / `Linear8bitLt` would hold, and the op is the
one those modules call (`bnb.matmul_4bit` / `bnb.matmul`).

Rules:
1. Sites are chosen like `target_modules` (default `"all-linear"`: every linear site except a
   transformers model's output layer), minus `exclude_modules`. A selected site that is not linear,
   or whose weight other ops also read (a tied embedding), is refused before anything changes.
2. The quantized weight replaces the float one at the same path in the graph's module tree, so
   adapter files and site names do not change. The captured eager model keeps its own float
   weights (capture shares Parameters): delete it to free them; `quantize` logs the bytes the
   graph's quantized weights take (about 4.5 bits per weight for NF4 with double quant).
3. Adapters may be injected before or after (LoftQ: inject, then quantize); merged adapters are
   refused. `dequantize` also converts a user's `Linear4bit` / `Linear8bitLt` modules.
"""

from __future__ import annotations

import logging

import torch
import torch.fx
from torch import nn

from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.state import get_state, lora_tag, state_or_none
from lora_fx.errors import AdapterError, ConfigError, UnsupportedSiteError
from lora_fx.math import quant
from lora_fx.sites import Site, all_sites, find_sites
from lora_fx.sites.kinds import kind_of

__all__ = ["dequantize", "quantize"]

log = logging.getLogger(__name__)

_QUANT_OPS = {"nf4": quant.linear_4bit, "fp4": quant.linear_4bit, "int8": quant.linear_8bit}
_MM_OPS = (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)


def quantize(
    gm: torch.fx.GraphModule,
    quant_type: str = "nf4",
    *,
    target_modules: list[str] | str = "all-linear",
    exclude_modules: list[str] | str | None = None,
    compress_statistics: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> torch.fx.GraphModule:
    """Replace the selected linear sites' weights and ops by bitsandbytes ones, in place.

    Args:
        gm: A captured graph (full precision).
        quant_type: `"nf4"`, `"fp4"` (4-bit) or `"int8"`.
        target_modules: Sites to quantize, matched as `LoraConfig.target_modules`.
        exclude_modules: Sites to keep in full precision.
        compress_statistics: 4-bit double quantization (the absmax scales quantized to 8 bits).
        blocksize: 4-bit block size.
        compute_dtype: dtype of the 4-bit matmul (default: each weight's dtype).

    Returns:
        The same GraphModule, recompiled.

    Raises:
        ConfigError: An unsupported `quant_type` (the supported ones are listed).
        UnsupportedSiteError: A selected site is not linear, already quantized, or shares its
            weight with other ops.
        AdapterError: An adapter on the graph is merged.

    Example:
        >>> gm = lora_fx.capture(model, (ids,), {"use_cache": False}); del model
        >>> gm = lora_fx.quantize(gm, "nf4")
        >>> gm = lora_fx.inject(gm, LoraConfig(r=16, target_modules="all-linear"))   # QLoRA
    """
    # plan
    if quant_type not in _QUANT_OPS:
        raise ConfigError(
            f"quant_type={quant_type!r} is not supported; "
            f"supported: {list(quant.SUPPORTED_QUANT_TYPES)}"
        )
    quant.requires_bitsandbytes()
    _refuse_merged(gm)
    cfg = LoraConfig(target_modules=target_modules, exclude_modules=exclude_modules)
    sites = find_sites(gm, cfg)
    readers = _graph.tensor_readers(gm)
    for site in sites:
        _check_quantizable(gm, site, readers)

    # apply
    state = get_state(gm)
    before = after = count = 0
    for site in sites:
        weight = _graph.get_attr(gm, site.weight)
        dense = weight.detach().T if site.transposed else weight.detach()
        packed = quant.quantize_weight(
            dense,
            quant_type,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            compute_dtype=compute_dtype,
        )
        owner, _, name = site.weight.rpartition(".")
        setattr(_graph.own_module(gm, owner, state), name, packed)
        for node, x in zip(site.nodes, site.inputs, strict=True):
            _replace_op(gm, site, node, x, _QUANT_OPS[quant_type])
        before += weight.numel() * weight.element_size()
        after += quant.storage_bytes(packed)
        count += weight.numel()

    # finish
    _graph.cleanup(gm)
    log.info(
        "quantize: %d sites -> %s: base weights %s -> %s bytes (%.2f bits per weight)",
        len(sites),
        quant_type,
        f"{before:,d}",
        f"{after:,d}",
        8 * after / max(count, 1),
    )
    return gm


def dequantize(gm: torch.fx.GraphModule, dtype: torch.dtype | None = None) -> torch.fx.GraphModule:
    """Turn every bitsandbytes linear site back into a full-precision linear, in place.

    Adapters stay on their sites; merging afterwards is exact (no re-quantization).

    Args:
        gm: A graph with quantized sites (`quantize`, or captured bitsandbytes modules).
        dtype: The new weights' dtype (default: the 4-bit compute dtype; float32 for int8).

    Returns:
        The same GraphModule, recompiled.

    Example:
        >>> gm = lora_fx.merge_and_unload(lora_fx.dequantize(gm))  # merge_and_unload(..., True)
    """
    _refuse_merged(gm)
    sites = [s for s in all_sites(gm).values() if kind_of(s).can.quantized]
    sites = [s for s in sites if quant.is_quantized(_graph.get_attr(gm, s.weight))]
    state = get_state(gm)
    for site in sites:
        node = site.nodes[0]
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        weight = _graph.get_attr(gm, site.weight)
        value = quant.dequantize(weight, module).to(dtype or quant.logical_dtype(weight))
        dense = nn.Parameter(value, requires_grad=False)
        if module is not None:
            linear = nn.Linear(site.in_features, site.out_features, bias=module.bias is not None)
            linear.weight = dense
            if module.bias is not None:
                linear.bias = module.bias
            linear._modules.update(module._modules)  # adapters (lora_A, ...) live under the site
            linear.train(module.training)
            _graph.set_module(gm, node.target, linear)
            state.owned_modules.add(node.target)
            continue
        owner, _, name = site.weight.rpartition(".")
        setattr(_graph.own_module(gm, owner, state), name, dense)
        for node in site.nodes:
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.aten.linear.default, tuple(node.args))
            _swap(gm, node, new)
    _graph.cleanup(gm)
    log.info("dequantize: %d sites", len(sites))
    return gm


def _check_quantizable(
    gm: torch.fx.GraphModule, site: Site, readers: dict[int, list[torch.fx.Node]]
) -> None:
    """A float linear site whose weight no other op reads."""
    weight = _graph.get_attr(gm, site.weight)
    if not kind_of(site).can.quantized:
        raise UnsupportedSiteError(
            f"quantize handles linear sites; {site.fqn!r} is a {site.kind} site "
            "(exclude it with exclude_modules)"
        )
    if quant.is_quantized(weight) or not weight.is_floating_point():
        raise UnsupportedSiteError(
            f"site {site.fqn!r} already has a {quant.quant_type(weight) or weight.dtype} weight"
        )
    own = set(site.nodes)
    for reader in readers.get(id(weight), []):
        if reader in own or lora_tag(reader) is not None:
            continue
        users = {u for u in reader.users if lora_tag(u) is None}
        if users <= own or all(_is_transpose_into(u, own) for u in users):
            continue
        raise UnsupportedSiteError(
            f"site {site.fqn!r} shares its weight with {reader.format_node()}; quantizing it "
            "would change that op too (exclude it with exclude_modules)"
        )


def _is_transpose_into(node: torch.fx.Node, own: set[torch.fx.Node]) -> bool:
    """`t(P)` feeding only the site's own mm nodes (an `mm(x, t(P))` site)."""
    return node.op == "call_function" and bool(node.users) and set(node.users) <= own


def _replace_op(
    gm: torch.fx.GraphModule, site: Site, node: torch.fx.Node, x: torch.fx.Node, op
) -> None:
    """Swap one site node for `op(x, W, b)`, reading the (now quantized) weight path."""
    graph = gm.graph
    with graph.inserting_before(node):
        w = graph.get_attr(site.weight)
        b = graph.get_attr(site.bias) if site.bias is not None else None
        new = graph.call_function(op, (x, w, b))
    old_inputs = [n for n in node.all_input_nodes if n is not x]
    _swap(gm, node, new)
    for n in old_inputs:  # the float weight's get_attr, a t(W) for mm sites, the old bias getter
        if not n.users and n.op in ("get_attr", "call_function"):
            graph.erase_node(n)


def _swap(gm: torch.fx.GraphModule, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """Put `new` in `old`'s place (meta kept: site names come from nn_module_stack)."""
    new.meta.update({k: v for k, v in old.meta.items() if k != "val"})
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def _refuse_merged(gm: torch.fx.GraphModule) -> None:
    """Quantizing under a merged adapter would bake the delta into the quantized codes."""
    state = state_or_none(gm)
    merged = [n for n, rec in state.adapters.items() if rec.merged] if state else []
    if merged:
        raise AdapterError(f"adapters {merged} are merged; unmerge them first")
