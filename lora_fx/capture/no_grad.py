"""Inline export's no-grad regions, so torch.compile sees one graph without breaks.

    outs = wrap_with_set_grad_enabled(False, submod, *args); y = outs[i]
        ->  <submod's nodes on args>; y = detach(out_i)

torch.export keeps a `with torch.no_grad():` block of the model (transformers' rotary embedding
has one) as a higher-order op around a submodule; dynamo breaks the graph there. The body's
results carry no gradient, which `detach` keeps exactly.

Rules:
1. Only regions that turn grad off are inlined (turning it on inside a no-grad graph stays as is).
2. A body that reads attributes of its own (`get_attr`) is left alone.
3. Each `detach` takes its input's module stack and value metadata: it belongs to the region's
   module (`rotary_emb`), and passes that place nodes by module read it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

__all__ = ["inline_no_grad_regions"]

_GRAD_REGION = torch.ops.higher_order.wrap_with_set_grad_enabled
_KEPT_META = ("nn_module_stack", "stack_trace", "val", "tensor_meta")


def inline_no_grad_regions(gm: torch.fx.GraphModule) -> bool:
    """Inline every `wrap_with_set_grad_enabled(False, ...)` region, in place; True if any."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _GRAD_REGION or node.args[0]:
            continue
        body_ref = node.args[1]
        body = gm.get_submodule(body_ref.target)
        if any(n.op == "get_attr" for n in body.graph.nodes):
            continue
        if not all(u.target is operator.getitem for u in node.users):
            continue
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        values = dict(zip(placeholders, node.args[2:], strict=True))
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(body.graph, values)
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            for user in list(node.users):
                out = outputs[user.args[1]]
                detached = gm.graph.call_function(torch.ops.aten.detach.default, (out,))
                # the region's module (rotary_emb) and value: passes read both
                detached.meta.update({k: out.meta[k] for k in _KEPT_META if k in out.meta})
                user.replace_all_uses_with(detached)
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not body_ref.users:
            gm.graph.erase_node(body_ref)
            if not any(n.target == body_ref.target for n in gm.graph.nodes):
                delattr(gm, body_ref.target)
        changed = True
    if changed:
        gm.recompile()
    return changed
