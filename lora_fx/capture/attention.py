"""Give exported attention back SDPA's own causal and grouped-query modes.

    mask = <causal mask computed from arange / shapes only>
    k'   = reshape(expand(unsqueeze(k, 2), [B, Hkv, n, S, D]), [B, Hkv * n, S, D])   (repeat_kv)
    v'   = the same for v
    y    = sdpa(q, k', v', mask, p, False, scale=s)
        ->  y = sdpa(q, k, v, None, p, True, scale=s, enable_gqa=True)

Under `torch.export` transformers cannot skip its mask (it is tracing), so the graph carries an
explicit causal mask and `repeat_kv` copies of K and V. Eager transformers passes `is_causal=True`
and `enable_gqa=True` instead; in a training step autograd then saves K and V, not their n-fold
copies, and no mask. This rewrite restores that form where it is exact.

Rules:
1. The mask is replaced only if it is constant: every node it comes from is a deterministic
   `call_function` (no placeholder, get_attr, module call or random op). It is evaluated once and
   must equal `ones(L, S).tril()` (SDPA's `is_causal` pattern) in each [L, S] slice: `True`
   where allowed for a bool mask, `0` / `-inf` for a float one (not `finfo.min`: a finite
   penalty is only approximately zero weight). Its last two sizes must be L and S themselves,
   not broadcast ones. A mask built from a user's `attention_mask` (or from symbolic shapes)
   reads a placeholder and is left alone.
2. `repeat_kv` is undone only when the call ends up with no mask, as transformers does
   (`use_gqa_in_sdpa`: GPU kernels fall back to the math path for GQA with a mask), and only if
   K and V are both repeated n times from tensors with the same head count. `enable_gqa=True`
   repeats heads as `repeat_interleave(n, dim=-3)`, which is `repeat_kv`'s order.
3. The SDPA node is edited in place: its name and `node.meta` (`nn_module_stack`, ...) stay.
   `dropout_p` and `scale` are kept.
4. Mask and repeat nodes left without users are erased, with the `_assert_tensor_metadata`
   checks on them; nodes still used elsewhere (position ids feed the rotary embedding) stay.
5. Graphs without the pattern (no SDPA, a padding mask, `method="fx"` graphs) are unchanged.
6. Dynamic shapes: a mask may read the inputs' sizes (`sym_size`), never their values. It is
   then evaluated at several sizes and must be causal at each: the example's; L = S = 1, 2, 3,
   5 (other symbols, the batch, at 1); and L = S just past every integer constant in the mask's
   subgraph, since a sliding window or attention chunk of W positions looks causal below W
   (Mistral's `sliding_window=4096` is checked at 4097 and 4098). A constant past 8192 keeps the
   mask (it would be too large to check). This is a check at chosen points, not a proof: it
   relies on transformers' masks being causal, windowed or chunked patterns of the sizes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sympy
import torch
import torch.fx
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from lora_fx.core import graph as _graph

__all__ = ["fuse_causal_attention"]

log = logging.getLogger(__name__)

_SDPA_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)
_UNSQUEEZE_OPS = (torch.ops.aten.unsqueeze.default,)
_EXPAND_OPS = (torch.ops.aten.expand.default,)
_COPY_OPS = (torch.ops.aten.clone.default, torch.ops.aten.contiguous.default)
_RESHAPE_OPS = (
    torch.ops.aten.reshape.default,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
)
_SLICE_OPS = (torch.ops.aten.slice.Tensor,)
_ASSERT_OPS = (torch.ops.aten._assert_tensor_metadata.default,)
# Their values are not constants either (uninitialised memory), though torch tags them as pure.
_UNINITIALISED_OPS = (
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
)
_NO_SIZE = 2**62  # slice ends and other "to the end" sentinels are not window sizes
_MAX_EVAL_LENGTH = 8192  # past this a mask is not evaluated (its L x S slice gets too large)
# SDPA's positional parameters; scale and enable_gqa are keyword-only.
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


@dataclass(frozen=True)
class _Repeat:
    """A `repeat_kv(source, n)` chain: its input and its nodes, output last."""

    source: torch.fx.Node
    n: int
    nodes: tuple[torch.fx.Node, ...]


@dataclass(frozen=True)
class _Edit:
    """One SDPA call to rewrite: drop its causal mask, and maybe its K/V repeats."""

    node: torch.fx.Node
    mask: torch.fx.Node | None
    key: _Repeat | None
    value: _Repeat | None


def fuse_causal_attention(gm: torch.fx.GraphModule) -> int:
    """In place: use SDPA's `is_causal` / `enable_gqa` instead of a causal mask and `repeat_kv`.

    Args:
        gm: An ATen graph from `torch.export` (as `lora_fx.capture` makes it).

    Returns:
        How many attention calls were rewritten (0: the graph is unchanged).

    Example:
        >>> gm = torch.fx.GraphModule(program.module(), program.module().graph)
        >>> fuse_causal_attention(gm)  # capture(method="export") runs it; 2-layer Llama:
        2
    """
    # plan
    masks: dict[torch.fx.Node, bool] = {}
    edits = [e for node in gm.graph.nodes if (e := _plan(node, masks)) is not None]
    if not edits:
        return 0
    # apply
    dropped: list[torch.fx.Node] = []
    for edit in edits:
        bound = _bind(edit.node)
        if edit.mask is not None:
            bound["attn_mask"], bound["is_causal"] = None, True
            dropped.append(edit.mask)
        if edit.key is not None and edit.value is not None:
            bound["key"], bound["value"] = edit.key.source, edit.value.source
            bound["enable_gqa"] = True
            dropped += [*edit.key.nodes, *edit.value.nodes]
        edit.node.args = tuple(bound.pop(name) for name in _SDPA_PARAMS)
        edit.node.kwargs = bound
        log.debug("fuse_causal_attention: %s", edit.node.format_node())
    # finish
    erased = _erase_unused(gm.graph, dropped)
    _graph.cleanup(gm)
    gqa = sum(e.key is not None for e in edits)
    log.info(
        "fuse_causal_attention: %d attention calls -> is_causal (%d with enable_gqa), "
        "%d nodes erased",
        len(edits),
        gqa,
        erased,
    )
    return len(edits)


def _plan(node: torch.fx.Node, masks: dict[torch.fx.Node, bool]) -> _Edit | None:
    """The edit for one SDPA node, or None if nothing about it is exact to change."""
    if node.op != "call_function" or node.target not in _SDPA_OPS:
        return None
    bound = _bind(node)
    mask = bound.get("attn_mask")
    q, k = _shape(bound["query"]), _shape(bound["key"])
    if q is None or k is None or len(q) != 4 or len(k) != 4:
        return None
    causal_mask = mask is not None and not bound.get("is_causal", False)
    if causal_mask:
        # The mask must be [..., L, S] itself: a broadcast row ([..., 1, S]) is not causal.
        if (_shape(mask) or (0, 0))[-2:] != (q[2], k[2]):
            return None
        if mask not in masks:
            masks[mask] = _is_causal_mask(mask)
        if not masks[mask]:
            return None
    elif mask is not None:
        return None
    key, value = _repeat_kv(bound["key"]), _repeat_kv(bound["value"])
    gqa = (
        key is not None
        and value is not None
        and key.n == value.n
        and _shape(key.source)[1] == _shape(value.source)[1]
        and q[1] == k[1]  # as many query heads as repeated K/V heads
        and not bound.get("enable_gqa", False)
    )
    if not causal_mask and not gqa:
        return None
    return _Edit(node, mask if causal_mask else None, key if gqa else None, value if gqa else None)


def _bind(node: torch.fx.Node) -> dict:
    """SDPA's arguments by name, defaults filled in."""
    schema = node.target._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip(_SDPA_PARAMS, node.args, strict=False))  # args: a prefix of the params
    bound.update(node.kwargs)
    return bound


def _is_causal_mask(mask: torch.fx.Node) -> bool:
    """Whether `mask` is computed from constants and sizes only and is SDPA's causal pattern."""
    try:
        return all(_causal(_evaluate(mask, sizes)) for sizes in _size_cases(mask))
    except Exception as e:  # an op that cannot run outside its graph: keep the mask
        log.debug("fuse_causal_attention: cannot evaluate %s: %s", mask.format_node(), e)
        return False


def _causal(value: object) -> bool:
    """Whether a mask value equals `ones(L, S).tril()` in each [L, S] slice (rule 1)."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    # causal[i, j] = j <= i: SDPA's is_causal pattern (top-left aligned when L != S)
    causal = torch.ones(value.shape[-2:], dtype=torch.bool, device=value.device).tril()
    if value.dtype == torch.bool:
        return bool(torch.equal(value, causal.expand(value.shape)))
    if not value.is_floating_point():
        return False
    allowed = causal.expand(value.shape)
    return bool((value[allowed] == 0).all() and (value[~allowed] == float("-inf")).all())


def _size_cases(mask: torch.fx.Node) -> list[dict[sympy.Symbol, int]]:
    """Values of the mask's symbolic sizes to check it at (rule 6); [{}] for a static mask.

    The example's sizes; L = S = 1, 2, 3, 5; and L = S just past every integer constant the
    mask is built from (a sliding window or attention chunk of size W looks causal below W).
    Other symbols (the batch) take 1 there. Raises ValueError where a case would be too large
    to evaluate.
    """
    inputs = _subgraph(mask)
    if inputs is None:
        raise ValueError("the mask reads an input, attribute or random op")
    nodes, syms = inputs
    if not syms:
        return [{}]
    env = next(iter(syms.values())).node.shape_env
    examples = getattr(env, "backed_var_to_val", None) or env.var_to_val  # renamed in torch 2.12
    hint = {s: int(examples[s]) for s in syms}
    shape = mask.meta["val"].shape
    axes = set().union(
        *(
            sympy.sympify(d.node.expr if isinstance(d, torch.SymInt) else d).free_symbols
            for d in shape[-2:]
        )
    )
    constants = {
        a
        for n in nodes
        for a in pytree.tree_leaves((n.args, n.kwargs))
        if isinstance(a, int) and not isinstance(a, bool) and 3 < a < _NO_SIZE
    }
    lengths = {1, 2, 3, 5} | {c + d for c in constants for d in (1, 2)}
    if max(lengths) > _MAX_EVAL_LENGTH:
        raise ValueError(f"a constant {max(constants)} in the mask is too large to check past")
    cases = [hint]
    for length in sorted(lengths):
        case = {s: _clip(s, env, length if s in axes else 1) for s in syms}
        if case not in cases:
            cases.append(case)
    return cases


def _clip(sym: sympy.Symbol, env: object, value: int) -> int:
    """`value` within the range export found for `sym` (its upper bound; any lower one is 0/1)."""
    bounds = env.var_to_range.get(sym)
    if bounds is None or bounds.upper > _NO_SIZE:  # torch's int_oo: unbounded
        return value
    return min(value, int(bounds.upper))


def _subgraph(
    node: torch.fx.Node,
) -> tuple[list[torch.fx.Node], dict[sympy.Symbol, torch.SymInt]] | None:
    """The nodes computing `node` (sizes as leaves) and its size symbols; None if not constant."""
    order: list[torch.fx.Node] = []
    syms: dict[sympy.Symbol, torch.SymInt] = {}
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt):  # a size: a leaf, evaluated from its expression
            for s in val.node.expr.free_symbols:
                syms[s] = val
            order.append(n)
            continue
        if n.op != "call_function" or _is_random(n):
            return None
        order.append(n)
        stack.extend(n.all_input_nodes)
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(order, key=position.__getitem__), syms


def _evaluate(node: torch.fx.Node, sizes: dict[sympy.Symbol, int]) -> object | None:
    """Run the subgraph computing `node` at `sizes` for its symbols (None: not constant)."""
    found = _subgraph(node)
    if found is None:
        return None
    env: dict[torch.fx.Node, object] = {}
    with torch.no_grad():
        for n in found[0]:
            val = n.meta.get("val")
            if isinstance(val, torch.SymInt):
                env[n] = int(val.node.expr.xreplace(sizes))
                continue
            args = map_arg(n.args, env.__getitem__)
            kwargs = map_arg(n.kwargs, env.__getitem__)
            env[n] = n.target(*args, **kwargs)
    return env[node]


def _is_random(node: torch.fx.Node) -> bool:
    """Whether the op's value is not a constant: it draws random numbers or reads raw memory."""
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags or node.target in _UNINITIALISED_OPS


def _repeat_kv(node: torch.fx.Node) -> _Repeat | None:
    """Match `reshape(expand(unsqueeze(x, 2), [B, H, n, S, D]), [B, H * n, S, D])`.

    Whole-axis slices (`x[:, :, None]` under dynamic shapes) between the steps are skipped.
    """
    out = node
    chain = [node]
    if not _is_call(node, _RESHAPE_OPS):
        return None
    node = _skip_full_slices(node.args[0], chain)
    if _is_call(node, _COPY_OPS):  # a decomposed reshape: clone + _unsafe_view
        chain.append(node)
        node = _skip_full_slices(node.args[0], chain)
    if not _is_call(node, _EXPAND_OPS):
        return None
    expand = node
    chain.append(expand)
    unsqueeze = _skip_full_slices(expand.args[0], chain)
    if not _is_call(unsqueeze, _UNSQUEEZE_OPS) or unsqueeze.args[1] not in (2, -3):
        return None
    chain.append(unsqueeze)
    source = _skip_full_slices(unsqueeze.args[0], chain)
    shapes = [_shape(n) for n in (source, expand, out)]
    if any(s is None for s in shapes):
        return None
    (b, h, s, d), expanded, repeated = shapes
    if len(expanded) != 5 or expanded[:2] != (b, h) or expanded[3:] != (s, d):
        return None
    n = expanded[2]
    if not isinstance(n, int) or n < 2 or repeated != (b, h * n, s, d):
        return None
    return _Repeat(source, n, tuple(chain))


def _skip_full_slices(node: object, chain: list[torch.fx.Node]) -> object:
    """Follow `slice(x, dim, 0, <end>)` nodes that keep a whole axis back to `x`, adding them."""
    while _is_call(node, _SLICE_OPS) and _is_full_slice(node):
        chain.append(node)
        node = node.args[0]
    return node


def _is_full_slice(node: torch.fx.Node) -> bool:
    """Whether a `slice.Tensor` node keeps its whole axis (start 0, step 1, end past the end)."""
    _, dim, start, end, step = (*node.args, *(None,) * 5)[:5]
    return (
        (start or 0) == 0
        and (step or 1) == 1
        and (end is None or (isinstance(end, int) and end >= _NO_SIZE))
        and isinstance(dim, int)
    )


def _shape(node: object) -> tuple[int | sympy.Expr, ...] | None:
    """A node's shape from export's `meta['val']` (sympy expressions for dynamic sizes), or None."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else d for d in val.shape)


def _is_call(node: object, ops: tuple) -> bool:
    """Whether `node` is a call_function of one of `ops`."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ops


def _erase_unused(graph: torch.fx.Graph, roots: list[torch.fx.Node]) -> int:
    """Erase `roots` and their inputs once nothing but metadata asserts uses them; count erased."""
    erased: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in erased or node.op != "call_function" or _is_random(node):
            continue
        if any(not _is_call(u, _ASSERT_OPS) for u in node.users):
            continue
        inputs = node.all_input_nodes
        for check in list(node.users):
            graph.erase_node(check)
            erased.add(check)
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)
    return len(erased)
