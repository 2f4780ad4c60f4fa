"""Trainable-token sites (`trainable_token_indices`): chosen rows of an embedding train in full.

    found by name (the config), not by op: the embedding site's ops, plus a tied output layer's
    branch:  W' = index_copy(W, 0, rows, delta) where the ops read W (`passes/_param.py`)
    merge:   W[rows] <- delta;  unmerge: W[rows] <- the rows merge replaced

The site is named `<embedding>.token_adapter` (PEFT's wrapper), so the tensor lives at
`<embedding>.token_adapter.trainable_tokens_delta.<adapter>` and is saved as
`base_model.model.<embedding>.token_adapter.trainable_tokens_delta`: PEFT's names.

Rules (PEFT 0.21.2's `_set_trainable` and `TrainableTokensLayer`):
1. A list of ids adapts the input embedding (the captured model's `get_input_embeddings()`, else
   a module ending in `embed_tokens`); a dict key selects every embedding whose name ends with it
   (a plain `endswith`, as PEFT matches).
2. The delta starts as the rows' current values and *replaces* them (PEFT's `index_copy`), so a
   trained file gives the same model whatever the base's values at those rows.
3. When the config ties the output layer to the input embedding (`tie_word_embeddings`) and the
   two read one tensor, the output layer reads the same new rows; it has no tensor of its own and
   nothing of it is saved. A dict naming the tied output layer with the embedding's ids is the
   same thing; with other ids it is refused (`ensure_weight_tying=True` raises PEFT's error).
4. Refused by name: ids out of range, a key naming no embedding, an embedding that is also a LoRA
   target, an op that reads the weight inside a module call (capture with export).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx

from lora_fx.core.state import CAPTURE_META, SiteRecord, state_or_none
from lora_fx.errors import ConfigError, NoTargetMatchedError, UnsupportedSiteError
from lora_fx.sites.embedding import EMBEDDING
from lora_fx.sites.kind import Capabilities, SiteKind
from lora_fx.sites.node_reads import base_weight_read, parameter_path
from lora_fx.sites.site import Site

__all__ = ["TOKENS", "find_token_sites", "recorded_token_sites", "token_weights", "weight_arg"]

SUFFIX = ".token_adapter"  # PEFT's wrapper: `<embedding>.token_adapter.trainable_tokens_delta`
_DEFAULT_EMBEDDING = "embed_tokens"  # PEFT's fallback name for a list of ids


def token_weights(
    gm: torch.fx.GraphModule, cfg: Any, sites: dict[str, Site], *, check: bool = True
) -> dict[str, tuple[int, ...]]:
    """`{embedding site: rows}` the config's `trainable_token_indices` selects (rules 1, 4).

    Raises:
        NoTargetMatchedError: A key (or, for a list, the input embedding) names no embedding.
        UnsupportedSiteError: An id is out of the embedding's range.
        ConfigError: Different ids on tied layers with `ensure_weight_tying=True`.
    """
    tokens = cfg.trainable_token_indices
    if tokens is None:
        return {}
    record = gm.meta.get(CAPTURE_META, {})
    named = tokens if isinstance(tokens, dict) else {_input_embeddings(record): tokens}
    tied = record.get("tied_output") or []
    embeddings = [fqn for fqn, site in sites.items() if _is_embedding(site)]
    chosen: dict[str, tuple[int, ...]] = {}
    for key, ids in named.items():
        hits = [fqn for fqn in embeddings if fqn.endswith(key)]
        outputs = [fqn for fqn in tied if fqn.endswith(key)]
        if not hits and outputs:
            _check_tied_ids(cfg, key, ids, named, record)
            continue  # the tied output reads the input embedding's rows (rule 3)
        if not hits:
            raise NoTargetMatchedError(
                f"trainable_token_indices key {key!r} names no embedding; embeddings in this "
                f"graph: {embeddings[:6]!r}"
            )
        for fqn in hits:
            size = sites[fqn].in_features
            outside = [i for i in ids if i >= size]
            if outside:
                raise UnsupportedSiteError(
                    f"trainable_token_indices for {fqn!r}: ids {outside[:6]} are out of range; "
                    f"the embedding has {size} rows (ids 0..{size - 1})"
                )
            chosen[fqn] = tuple(ids)
    if check and cfg.ensure_weight_tying and not tied:
        warnings.warn(
            "ensure_weight_tying=True but the model does not have tied weights "
            "(tie_word_embeddings=False); trainable_token_indices adapt the embedding alone "
            "(as in PEFT)",
            stacklevel=4,
        )
    return chosen


def find_token_sites(gm: torch.fx.GraphModule, cfg: Any, sites: dict[str, Site]) -> list[Site]:
    """The trainable-token sites of a config: one per chosen embedding (rules 1-4).

    Raises:
        UnsupportedSiteError: An op of the site reads the weight inside a module call.
    """
    record = gm.meta.get(CAPTURE_META, {})
    found = []
    for fqn in token_weights(gm, cfg, sites):
        site = sites[fqn]
        weight = gm.get_parameter(site.weight)
        nodes = list(site.nodes)
        if fqn == record.get("input_embeddings"):
            for out in record.get("tied_output") or []:
                reader = sites.get(out)
                if reader is not None and gm.get_parameter(reader.weight) is weight:
                    nodes += reader.nodes  # rule 3
        for node in nodes:
            if weight_arg(gm, node, weight) is None:
                raise UnsupportedSiteError(
                    f"trainable_token_indices on {fqn!r}: {node.format_node()} reads the "
                    "weight inside a module call (a custom forward); capture with "
                    "method='export'"
                )
        found.append(
            Site(
                fqn=fqn + SUFFIX,
                kind="tokens",
                nodes=tuple(nodes),
                inputs=tuple(nodes),
                weight=site.weight,
                bias=None,
                in_features=site.in_features,
                out_features=site.out_features,
            )
        )
    return found


def recorded_token_sites(gm: torch.fx.GraphModule, sites: dict[str, Site]) -> dict[str, Site]:
    """Trainable-token sites of the adapters already on the graph, by name."""
    state = state_or_none(gm)
    if state is None:
        return {}
    found: dict[str, Site] = {}
    for rec in state.adapters.values():
        if rec.config.trainable_token_indices is not None:
            with warnings.catch_warnings():  # the config's warnings were given at inject
                warnings.simplefilter("ignore")
                found.update({s.fqn: s for s in find_token_sites(gm, rec.config, sites)})
    return found


def weight_arg(gm: torch.fx.GraphModule, node: torch.fx.Node, weight: torch.Tensor) -> int | None:
    """The position of the argument through which `node` reads `weight`, or None."""
    if node.op != "call_function":
        return None
    for index, value in enumerate(node.args):
        path = parameter_path(gm, base_weight_read(value))
        if path is not None and gm.get_parameter(path) is weight:
            return index
    return None


def _input_embeddings(record: dict[str, Any]) -> str:
    """The name a list of ids adapts: the input embedding, else PEFT's `embed_tokens`."""
    return record.get("input_embeddings") or _DEFAULT_EMBEDDING


def _is_embedding(site: Site) -> bool:
    """An embedding module's site, not a functional lookup elsewhere."""
    return site.module and site.kind == EMBEDDING.name


def _check_tied_ids(
    cfg: Any, key: str, ids: list[int], named: dict[str, list[int]], record: dict[str, Any]
) -> None:
    """A key naming the tied output layer must carry the input embedding's ids (rule 3)."""
    embedding = record.get("input_embeddings") or ""
    same = any(embedding.endswith(k) and list(v) == list(ids) for k, v in named.items())
    if same:
        return
    if cfg.ensure_weight_tying:
        raise ConfigError(
            "Cannot ensure weight tying when different token indices are specified for tied "
            f"layers: {key!r} gets {list(ids)}, the input embedding {embedding!r} "
            f"{[v for k, v in named.items() if embedding.endswith(k)]}; use the same indices "
            "for all tied layers or set ensure_weight_tying=False (PEFT's rule)"
        )
    raise UnsupportedSiteError(
        f"trainable_token_indices key {key!r} is an output layer tied to {embedding!r} but "
        f"has other ids than it; give both the same ids (the layer then reads the embedding's "
        "new rows), or leave the output layer out"
    )


def _record(cfg: Any, site: Site) -> SiteRecord:
    """Rows from the config; no rank, scale, dropout, DoRA or bias on a token site."""
    embedding = site.fqn.removesuffix(SUFFIX)
    tokens = cfg.trainable_token_indices
    named = tokens if isinstance(tokens, dict) else {embedding: tokens}
    rows = next(tuple(v) for k, v in named.items() if embedding.endswith(k))
    return SiteRecord("tokens", len(rows), cfg.lora_alpha, 1.0, 0.0, False, rows=rows)


def _factor_shapes(site: Site, r: int) -> tuple[tuple[int, int]]:
    """The delta `[rows, dim]`."""
    return ((r, site.out_features),)


def _new_factors(site: Site, r: int, lora_bias: bool, init: bool | str) -> tuple[torch.Tensor]:
    """A `[rows, dim]` placeholder; `_init_factors` fills it from the weight."""
    return (torch.zeros(r, site.out_features),)


def _init_factors(site: Site, rec: SiteRecord, weight: torch.Tensor) -> tuple[torch.Tensor]:
    """PEFT's init: the rows' current values (whatever `init_lora_weights` says)."""
    return (weight.detach()[list(rec.rows)].clone(),)


def _no_delta(site: Site, a: torch.Tensor, b: torch.Tensor, scale: float, shape) -> torch.Tensor:
    """Token sites replace rows (`_fold` writes them); they have no additive delta."""
    raise UnsupportedSiteError(
        f"site {site.fqn!r} replaces embedding rows (trainable tokens); it has no additive delta"
    )


TOKENS = SiteKind(
    name="tokens",
    label="trainable_token_indices site",
    matchers=(),  # chosen by `trainable_token_indices`, never by op
    holders=("trainable_tokens_delta",),
    factor_suffix="",
    factor_shapes=_factor_shapes,
    new_factors=_new_factors,
    emit_down=None,
    emit_up=None,
    emit_base=None,
    delta=_no_delta,
    fold_factors=lambda site, w, a, b: None,
    magnitude_shape=lambda site: (site.out_features,),
    can=Capabilities(
        dora=False,
        lora_bias=False,
        mixed_batch=False,
        onnx=False,
        layouts=("plain",),
        branch_at="rows",
    ),
    new_record=_record,
    init_factors=_init_factors,
)
