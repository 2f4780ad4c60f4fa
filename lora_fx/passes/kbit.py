"""Prepare a k-bit (quantized) graph for training: PEFT's `prepare_model_for_kbit_training`.

    W: bfloat16 / float16 parameter (not a 4-bit one)  ->  W: float32
    every parameter                                    ->  requires_grad = False
    h = embedding(W_emb, input_ids)                    ->  h = embedding(W_emb, input_ids)
                                                           h = h.requires_grad_(True)

Rules:
1. Casts are PEFT's: every parameter whose dtype is float16 or bfloat16 becomes float32, except
   bitsandbytes' 4-bit `Params4bit` (its float16 / bfloat16 storage is packed codes, never cast);
   int8 `Int8Params` are int8 and stay. Buffers are not cast (PEFT casts `model.parameters()`).
   The parameter objects are kept (`param.data` is replaced), so optimizers and the module tree
   still hold them.
2. Every parameter is frozen, the base's and any adapter's already injected, as PEFT's loop is;
   inject adapters afterwards (PEFT's order: prepare, then `get_peft_model`).
3. Inputs that require grad: PEFT registers a forward hook on the input embeddings that calls
   `output.requires_grad_(True)` when the base is k-bit and `use_gradient_checkpointing` is set,
   so that reentrant checkpointing of the first block sees an input that requires grad (else
   no gradient flows into the block's LoRA weights). In a graph the hook is a node: the output of
   every embedding that reads a graph input gets a `requires_grad_(True)` call whose result
   replaces it for every user, tagged `node.meta[INPUT_GRAD_META]` (not a LoRA branch node, so
   `sync` keeps it; a second call adds none).
4. A captured graph bakes the dtypes it saw: `h.to(input_dtype)` is `_to_copy(h, dtype=bfloat16)`,
   and export asserts dtypes (`_assert_tensor_metadata(dtype=bfloat16)`). PEFT's eager model
   follows its now float32 parameters; the graph follows once those literals change: when any
   parameter is cast, every float16 / bfloat16 dtype in a node's arguments becomes float32, and
   export's dtype assertions that name one are erased (they check what the capture saw: a
   buffer PEFT leaves in bfloat16 and a cast input now in float32 would both fail them). The
   k-bit ops take their compute dtype from the weight's quant state, not from the graph, so they
   keep it (as bitsandbytes' modules keep `compute_dtype`). A model that casts to a half dtype on
   purpose, whatever its weights, loses that cast here.
5. Gradient checkpointing itself is `checkpoint_blocks`, run after `inject` (the LoRA passes need
   the flat graph); PEFT's flag here only prepares for it, which is what this pass does with it.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.fx

from lora_fx.core import graph as _graph
from lora_fx.core.state import INPUT_GRAD_META
from lora_fx.math import quant
from lora_fx.passes._rollback import transactional
from lora_fx.sites import all_sites

__all__ = ["prepare_for_kbit_training"]

log = logging.getLogger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_4BIT_CLASS = "Params4bit"  # PEFT tests the class name too
_ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default  # export's dtype checks


@transactional
def prepare_for_kbit_training(
    gm: torch.fx.GraphModule, use_gradient_checkpointing: bool = True
) -> torch.fx.GraphModule:
    """Cast half-precision parameters to float32 and freeze them, in place, as PEFT does.

    Args:
        gm: A captured graph, typically after `lora_fx.quantize` (a k-bit base).
        use_gradient_checkpointing: With a k-bit base, make the input embeddings' output require
            grad (rule 3) so that checkpointed blocks get gradients, as PEFT's flag does.

    Returns:
        The same GraphModule, recompiled.

    Example:
        >>> gm = lora_fx.quantize(lora_fx.capture(model, (ids,)), "nf4")
        >>> gm = lora_fx.prepare_for_kbit_training(gm)
        >>> gm = lora_fx.inject(gm, LoraConfig(r=8, target_modules="all-linear"))
    """
    # plan
    params = dict(gm.named_parameters())
    casts = [
        name
        for name, p in params.items()
        if p.dtype in _HALF_DTYPES and type(p).__name__ != _4BIT_CLASS
    ]
    kbit = any(quant.is_quantized(p) for p in params.values())
    retyped = [n for n in gm.graph.nodes if casts and _half_dtypes_in(n)]
    marked = {n.args[0] for n in gm.graph.nodes if n.meta.get(INPUT_GRAD_META)}
    embeddings = []
    if kbit and use_gradient_checkpointing:
        embeddings = [node for node in _input_embeddings(gm) if node not in marked]
        if not embeddings and not marked:
            warnings.warn(
                "prepare_for_kbit_training: no embedding reads a graph input, so no output was "
                "made to require grad; checkpointed blocks get gradients only from their weights",
                stacklevel=3,
            )

    # apply
    for param in params.values():
        param.requires_grad_(False)
    for name in casts:
        params[name].data = params[name].data.to(torch.float32)
    for node in retyped:
        if node.target == _ASSERT_METADATA:
            gm.graph.erase_node(node)
        else:
            args = torch.fx.node.map_aggregate((node.args, node.kwargs), _to_float32)
            node.args, node.kwargs = args
    for node in embeddings:
        _require_grad_after(gm.graph, node)

    # finish
    _graph.cleanup(gm)
    log.info(
        "prepare_for_kbit_training: %d parameters frozen, %d cast to float32 (%d nodes retyped), "
        "%d embedding outputs require grad",
        len(params),
        len(casts),
        len(retyped),
        len(embeddings),
    )
    return gm


def _half_dtypes_in(node: torch.fx.Node) -> bool:
    """Whether a node's arguments name float16 or bfloat16 (rule 4)."""
    found = []
    torch.fx.node.map_aggregate(
        (node.args, node.kwargs), lambda a: found.append(a) if a in _HALF_DTYPES else None
    )
    return bool(found)


def _to_float32(arg):
    """float16 / bfloat16 -> float32; any other argument as it is."""
    return torch.float32 if isinstance(arg, torch.dtype) and arg in _HALF_DTYPES else arg


def _input_embeddings(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Embedding nodes whose ids are a graph input (PEFT's `get_input_embeddings()`)."""
    nodes = []
    for site in all_sites(gm).values():
        if site.kind == "embedding":
            pairs = zip(site.nodes, site.inputs, strict=True)
            nodes += [node for node, ids in pairs if ids.op == "placeholder"]
    return nodes


def _require_grad_after(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Route every user of `node` through `node.requires_grad_(True)` (rule 3)."""
    with graph.inserting_after(node):
        mark = graph.call_method("requires_grad_", (node, True))
    node.replace_all_uses_with(mark, delete_user_cb=lambda user: user is not mark)
    mark.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
    mark.meta[INPUT_GRAD_META] = True
    log.debug("prepare_for_kbit_training: %s", mark.format_node())
