"""Capture a model as a trainable `torch.fx.GraphModule`.

    model --torch.export / symbolic_trace--> GraphModule with
        * every `aten.dropout(x, p, train_flag)` turned into a `call_module` `nn.Dropout(p)`,
          so `gm.train()` / `gm.eval()` switch it (export bakes the flag as a constant);
        * non-tensor keyword arguments (`use_cache=False`) bound as constants, so `gm(ids)` works;
        * a plain `GraphModule` class, whose `train()` / `eval()` work (export's module refuses);
        * export only: a constant causal mask and `repeat_kv` copies feeding SDPA replaced by
          `is_causal=True` / `enable_gqa=True`, as eager transformers calls it (`attention.py`);
        * export only: dynamic batch and sequence axes for transformers models, and input checks
          that raise `ValueError` instead of torch's guard assertions (`shapes.py`);
        * export only: `torch.no_grad()` regions inlined with detached outputs (`no_grad.py`), so
          `torch.compile` retraces a dynamic graph at new sizes (it cannot trace the region op
          with symbolic sizes).

Rules and edge cases:
1. Export runs with the model in eval mode and then sets the graph to the model's own mode. Fused
   attention (`scaled_dot_product_attention`) therefore keeps `dropout_p=0`: attention-probability
   dropout is off in training (most LLM configs set it to 0 anyway).
2. The graph shares Parameter objects with the model (no copy): `merge` changes the model's weights.
3. Batch-norm is captured in eval form; its running statistics do not update in `gm.train()`.
4. fx only: each bitsandbytes `Linear4bit` becomes the graph's own copy (`quant.plain_copy`,
   sharing the weight) that stays on bitsandbytes' plain CPU path. On AVX512-BF16 CPUs the user's
   module would pack its weight in eval: a crash unless `out_features % 32 == 0` and
   `in_features % blocksize == 0`, bfloat16 compute, and no input gradient after (`quant.py`).
5. transformers models: `use_cache=False` is passed unless the caller says (a graph returns no
   cache; `use_cache=True` raises). Other models' shapes stay static by default: lora_fx cannot
   tell their batch axis from a feature axis, and their Python may branch on a size.
6. `args` must be a tuple (or one tensor); a dict raises TypeError rather than being taken as
   keyword inputs or as one positional dict, since both readings are plausible.
7. fx only: each `nn.MultiheadAttention` call (a leaf) becomes `sites.mha.multi_head_attention`
   with the module and its `in_proj_weight` / `out_proj.weight` as get_attr reads, so LoRA can
   rewrite those reads as in export graphs; the module's own forward still runs (train-mode
   dropout included). MHAs with separate q/k/v weights stay leaves.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from lora_fx.capture import shapes
from lora_fx.capture.attention import fuse_causal_attention
from lora_fx.capture.no_grad import inline_no_grad_regions
from lora_fx.capture.shapes import AUTO
from lora_fx.core import codegen
from lora_fx.core.graph import replace_with_call
from lora_fx.core.state import CAPTURE_META
from lora_fx.errors import CaptureError
from lora_fx.math import quant
from lora_fx.sites.mha import multi_head_attention
from lora_fx.sites.modules import site_modules
from lora_fx.sites.moe_targets import moe_family

__all__ = ["as_graph_module", "capture"]

log = logging.getLogger(__name__)

_DROPOUT_OPS = (torch.ops.aten.dropout.default,)
_METHODS = ("export", "fx")
_MHA_WEIGHTS = ("in_proj_weight", "out_proj.weight")  # what `multi_head_attention` takes
_BNB_LEAVES = (
    "Linear4bit",
    "LinearNF4",
    "LinearFP4",
    "Linear8bitLt",
    "Embedding4bit",
    "EmbeddingNF4",
    "EmbeddingFP4",
    "Embedding8bit",
)


def capture(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    method: str = "export",
    *,
    dynamic_shapes: Any = AUTO,
) -> torch.fx.GraphModule:
    """Capture `model` as a GraphModule that lora_fx passes can rewrite.

    Shapes: a transformers model is exported with axes 0 and 1 (batch and sequence) of every
    tensor input dynamic (`Dim.AUTO`: export keeps them static only where the model fixes them,
    and warns), so the graph runs at other batch sizes and lengths. An `attention_mask` in
    `kwargs` becomes an input of the graph (`gm(ids, attention_mask=m)`). Other models keep
    export's static shapes unless `dynamic_shapes` says otherwise: lora_fx cannot tell which of
    their axes are batch or sequence (axis 1 is often features or channels), and a model whose
    Python code branches on a size would be captured for one side of the branch only.
    `method="fx"` graphs are shape-generic already.

    Args:
        model: The eager model. Its parameters are shared with the graph, not copied.
        args: Example positional inputs (a tuple; a single tensor is taken as `(tensor,)`).
        kwargs: Example keyword inputs; non-tensor values (`use_cache=False`) become constants.
            A transformers model whose forward takes `use_cache` gets `use_cache=False` unless
            given: a captured graph returns no cache.
        method: `"export"` (torch.export; for transformers models) or `"fx"` (symbolic_trace).
        dynamic_shapes: `"auto"` (default): dynamic batch and sequence axes for transformers
            models, static shapes for others. `None` or `False`: static shapes (export's
            default). Anything else is passed to `torch.export.export` (a dict keyed by
            forward's argument names may leave out arguments that stay static, `use_cache`).

    Returns:
        A `torch.fx.GraphModule` whose `train()` / `eval()` switch every dropout. Calling it
        with a shape it was not captured for raises `ValueError` naming the input, the shape
        given and the shape expected.

    Raises:
        ValueError: `method` is not `"export"` or `"fx"`, or `use_cache=True` (a graph has no
            cache; see `lora_fx.capture_for_generation`).
        TypeError: `model` is not an `nn.Module`, or `args` is a dict (pass it as `kwargs`).
        CaptureError: The chosen method failed, or a dimension in `dynamic_shapes` cannot be
            dynamic; the message says why and what to pass.

    Example:
        >>> gm = lora_fx.capture(model, (ids,), {"attention_mask": mask})  # ids: [2, 8]
        >>> logits = gm(ids3, attention_mask=mask3).logits  # ids3: [3, 13]
        >>> static = lora_fx.capture(model, (ids,), dynamic_shapes=None)  # [2, 8] only
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is invalid; expected one of {list(_METHODS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs an nn.Module, got {type(model).__name__}")
    if isinstance(args, dict):
        raise TypeError(
            f"capture(model, args): args is a dict (keys {list(args)}); pass keyword inputs as "
            "kwargs, e.g. capture(model, (), kwargs={...}), or a dict meant as the single "
            "positional input as args=(d,)"
        )
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = _cache_off(model, dict(kwargs or {}))
    was_training = model.training
    try:
        model.eval()
        with _cache_off_in_config(model, kwargs):
            gm = (
                _export(model, args, kwargs, dynamic_shapes)
                if method == "export"
                else _trace(model, kwargs)
            )
    finally:
        model.train(was_training)
    gm.meta[CAPTURE_META] = capture_record(model, method)
    gm.train(was_training)
    if codegen.install(gm):  # parameter reads through the module dicts (core/codegen.py)
        gm.recompile()
    log.info("capture: %s via %s -> %d nodes", type(model).__name__, method, len(gm.graph.nodes))
    return gm


def capture_record(model: nn.Module, method: str) -> dict[str, Any]:
    """What passes later need to know of the captured model (`gm.meta[CAPTURE_META]`)."""
    return {
        "method": method,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "output_layer": _output_layer_name(model),
        # trainable tokens: the input embedding PEFT picks for a list of ids, and the modules
        # tied to it (`tie_word_embeddings`), which read the same new rows in PEFT
        **_embedding_record(model),
        # registration order: PEFT nests target_parameters wrappers in this order
        "parameters": [name for name, _ in model.named_parameters()],
        # which modules are sites by type (names sites; what all-linear takes)
        **site_modules(model),
        # PEFT rewrites LoRA configs of transformers-5 MoE models (`sites/moe_targets.py`)
        "moe_family": moe_family(getattr(getattr(model, "config", None), "model_type", None)),
    }


def as_graph_module(obj: Any) -> torch.fx.GraphModule:
    """Accept a GraphModule or an ExportedProgram; turn the latter into a trainable GraphModule."""
    if isinstance(obj, torch.export.ExportedProgram):
        gm = _trainable_module(obj.module())
        gm.meta.setdefault(
            CAPTURE_META, {"method": "export", "model_class": None, "output_layer": None}
        )
        return gm
    if isinstance(obj, torch.fx.GraphModule):
        return obj
    raise TypeError(
        "expected a torch.fx.GraphModule or torch.export.ExportedProgram, got "
        f"{type(obj).__name__}; "
        "capture an nn.Module first with lora_fx.capture(model, args)"
    )


def _export(
    model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any
) -> torch.fx.GraphModule:
    """torch.export, then the trainable-module fixes."""
    auto = isinstance(dynamic_shapes, str) and dynamic_shapes == AUTO
    if auto and _is_transformers(model):
        dynamic_shapes, args, kwargs = shapes.default_dynamic_shapes(model, args, kwargs)
    elif auto or dynamic_shapes is False:
        auto, dynamic_shapes = False, None
    else:
        dynamic_shapes = shapes.complete_spec(model, args, kwargs, dynamic_shapes)
    try:
        program = torch.export.export(
            model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False
        )
    except Exception as e:
        error = shapes.shape_error(model, e, dynamic_shapes)
        if error is not None:
            raise error from e
        hint = (
            "transformers models can only be captured with method='export'; check the example "
            "inputs, or pass dynamic_shapes=None for static shapes"
            if _is_transformers(model)
            else "for a model with simple Python control flow try method='fx'"
        )
        raise CaptureError(
            f"method='export' failed on {type(model).__name__}: "
            f"{type(e).__name__}: {_first_line(e)}; {hint}"
        ) from e
    gm = _trainable_module(program.module())
    if auto:
        shapes.warn_static_axes(gm, dynamic_shapes)
    _bind_constant_kwargs(gm, args, kwargs)
    inline_no_grad_regions(gm)  # dynamo cannot retrace the rotary's no_grad region at new sizes
    fuse_causal_attention(gm)
    return gm


def _cache_off(model: nn.Module, kwargs: dict) -> dict:
    """`use_cache=False` for transformers models that take it, unless given; refuse True."""
    if not _is_transformers(model):
        return kwargs
    if kwargs.get("use_cache") is True:
        raise ValueError(
            "capture(..., use_cache=True): a captured graph has no KV cache (it returns logits "
            "only); capture with use_cache=False (the default), or use "
            "lora_fx.capture_for_generation(model, ...) to generate with a cache"
        )
    if "use_cache" not in kwargs and "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


@contextlib.contextmanager
def _cache_off_in_config(model: nn.Module, kwargs: dict) -> Iterator[None]:
    """`config.use_cache = False` while capturing a model that takes it only in `**kwargs`.

    transformers 5's multimodal models (Llava) pass `use_cache` on through `**kwargs`, and
    torch.export cannot take a non-tensor inside `**kwargs` together with dynamic shapes (its
    checks want the `kwargs` key, its constraint builder the flattened names); the config's
    default reaches the language model the same way.
    """
    configs = []
    if _is_transformers(model) and kwargs.get("use_cache", False) is False:
        config = getattr(model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        text = get_text() if callable(get_text) else None
        configs = [c for c in {id(c): c for c in (config, text)}.values() if c is not None]
        configs = [c for c in configs if getattr(c, "use_cache", None) is not None]
    if "use_cache" in inspect.signature(model.forward).parameters or not configs:
        yield
        return
    kwargs.pop("use_cache", None)
    saved = [(c, c.use_cache) for c in configs]
    try:
        for c, _ in saved:
            c.use_cache = False
        yield
    finally:
        for c, value in saved:
            c.use_cache = value


def _is_transformers(model: nn.Module) -> bool:
    """Whether `model` is a transformers `PreTrainedModel` (checked without importing it)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
        for c in type(model).__mro__
    )


def _trace(model: nn.Module, kwargs: dict) -> torch.fx.GraphModule:
    """torch.fx.symbolic_trace, binding non-tensor kwargs as concrete."""
    concrete = {k: v for k, v in kwargs.items() if not _has_tensor(v)}
    try:
        tracer = _Tracer()
        graph = tracer.trace(model, concrete_args=concrete or None)
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:
        raise CaptureError(
            f"method='fx' failed on {type(model).__name__}: {type(e).__name__}: {_first_line(e)}; "
            "models with data-dependent control flow (e.g. transformers) need method='export'"
        ) from e
    _dropouts_to_modules(gm)
    _plain_linear_4bit(gm)
    _expose_attention_weights(gm)
    return gm


def _expose_attention_weights(gm: torch.fx.GraphModule) -> bool:
    """Rule 7: MHA leaf calls -> `multi_head_attention(mha, q, k, v, W_in, W_out, ...)`."""
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) < 3:
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.MultiheadAttention) or not module._qkv_same_embed_dim:
            continue
        with graph.inserting_before(node):
            reads = [graph.get_attr(node.target)]
            reads += [graph.get_attr(f"{node.target}.{w}") for w in _MHA_WEIGHTS]
        query, key, value, *rest = node.args
        args = (reads[0], query, key, value, *reads[1:], *rest)
        replace_with_call(node, multi_head_attention, args, dict(node.kwargs))
        changed = True
    if changed:
        gm.recompile()
    return changed


def _plain_linear_4bit(gm: torch.fx.GraphModule) -> bool:
    """Swap each called bitsandbytes `Linear4bit` for `quant.plain_copy` of it; True if any."""
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    changed = False
    for target in sorted(targets):
        module = gm.get_submodule(target)
        if not any(_is_bnb(c, "Linear4bit") for c in type(module).__mro__):  # NF4 / FP4 too
            continue
        gm.set_submodule(target, quant.plain_copy(module))
        log.debug("capture: %s: the graph's own Linear4bit, on the plain CPU path", target)
        changed = True
    return changed


def _is_bnb(cls: type, name: str) -> bool:
    """`cls` is bitsandbytes' class `name` (checked without importing bitsandbytes)."""
    return cls.__name__ == name and cls.__module__.startswith("bitsandbytes")


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, keeping bitsandbytes layers as leaves.

    Their forward is not traceable; as `call_module` nodes they are ordinary sites.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch.nn modules, and bitsandbytes' quantized linears and embeddings."""
        cls = type(m)
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in _BNB_LEAVES:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trainable_module(exported: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Re-wrap export's module as a plain GraphModule (train()/eval() allowed), live dropouts."""
    gm = torch.fx.GraphModule(exported, exported.graph)
    shapes.install_input_check(gm)
    _dropouts_to_modules(gm)
    # Export bakes each dropout's train flag; keep the mode the flags say the model was captured in.
    gm.train(False)
    return gm


def _dropouts_to_modules(gm: torch.fx.GraphModule) -> bool:
    """Replace `aten.dropout(x, p, flag)` nodes by `nn.Dropout(p)` modules; True if any."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _DROPOUT_OPS:
            continue
        x, p = node.args[0], float(node.args[1])
        path = _free_module_path(gm, _module_path(node) or "dropout")
        gm.add_submodule(path, nn.Dropout(p))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (x,))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _bind_constant_kwargs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """Turn placeholders of non-tensor kwargs into constants and drop them from the signature."""
    constant = {k for k, v in kwargs.items() if not _has_tensor(v)}
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if not constant or info is None:
        return False
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = pytree.tree_flatten_with_path((args, kwargs))[0]
    if len(leaves) != len(placeholders):
        return False  # an input layout we do not recognise: leave the signature as export made it
    for (path, value), node in zip(leaves, placeholders, strict=True):
        if len(path) >= 2 and getattr(path[1], "key", None) in constant:
            for user in list(node.users):
                user.args = pytree.tree_map(
                    lambda a, n=node, v=value: v if a is n else a, user.args
                )
                user.kwargs = pytree.tree_map(
                    lambda a, n=node, v=value: v if a is n else a, user.kwargs
                )
            gm.graph.erase_node(node)
    kept = {k: v for k, v in kwargs.items() if k not in constant}
    codegen.pytree_info = info._replace(
        orig_args=[a for a in info.orig_args if a not in constant],
        in_spec=pytree.tree_structure((args, kept)),
    )
    gm.recompile()
    return True


def _output_layer_name(model: nn.Module) -> str | None:
    """The output embedding of a transformers model (PEFT's all-linear skips it), else None."""
    get_output = getattr(model, "get_output_embeddings", None)
    if get_output is None or not type(model).__module__.startswith("transformers"):
        return None
    output = get_output()
    return next((name for name, m in model.named_modules() if m is output), None)


def _embedding_record(model: nn.Module) -> dict[str, Any]:
    """The input embedding's path and the output layers tied to it (trainable tokens).

    `input_embeddings` is None without `get_input_embeddings`; `tied_output` lists the output
    layer when the config says `tie_word_embeddings` and it reads the embedding's weight.
    """
    get_input = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get_input() if callable(get_input) else None
    except (AttributeError, NotImplementedError):
        embedding = None
    names = {id(m): name for name, m in model.named_modules()}
    record: dict[str, Any] = {"input_embeddings": names.get(id(embedding)), "tied_output": []}
    config = getattr(model, "config", None)
    output = _output_layer_name(model)
    if embedding is None or output is None or not getattr(config, "tie_word_embeddings", False):
        return record
    if getattr(model.get_submodule(output), "weight", None) is getattr(embedding, "weight", 0):
        record["tied_output"] = [output]
    return record


def _module_path(node: torch.fx.Node) -> str | None:
    """The innermost module path recorded by export for a node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def _free_module_path(gm: torch.fx.GraphModule, path: str) -> str:
    """`path` if nothing lives there yet, else `path_1`, `path_2`, ..."""
    candidate, i = path, 0
    while _exists(gm, candidate):
        i += 1
        candidate = f"{path}_{i}"
    return candidate


def _exists(gm: nn.Module, path: str) -> bool:
    """Whether an attribute path resolves on gm."""
    obj: Any = gm
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _has_tensor(value: Any) -> bool:
    """Whether a (nested) value holds a tensor."""
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _first_line(e: BaseException) -> str:
    """First line of an exception message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
