"""Find LoRA sites: the ops of a graph that read a parameter weight, and those a config selects.

A **site** is named by the module path PEFT would use (`model.layers.0.self_attn.q_proj`): the
`call_module` target, or for ATen graphs the innermost module in export's `nn_module_stack` when
that module is a Linear/Conv/Embedding/Conv1D, else the weight's path without `.weight`. Naming by
module rather than by weight keeps tied weights apart: GPT-2's `wte` embedding and `lm_head` read
one tensor but are two sites, as in PEFT.

Rules:
1. Each node is offered to the matchers of the kind table (`kinds.MATCHERS`: mha, linear, conv,
   embedding, in table order); the first match wins (a matcher may return several sites for one
   node, or none to claim it). Nodes created by lora_fx are never sites.
2. A module called twice (the same weight at two nodes with one name) is one site with two nodes.
3. Parameter sites (`target_parameters`) are found by parameter name (`params.py`), token sites
   (`trainable_token_indices`) by embedding name (`tokens.py`).
4. `find_sites` applies PEFT's matching rules, then checks each chosen site against its kind's
   flags (`kind.can`, `kind.refuse`): a config a site cannot carry is refused by name.
5. Regex patterns are matched by `lora_fx.patterns`, which never backtracks, so a pattern from an
   adapter file (`(.+)+z`) cannot hang `load_adapter`.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable

import torch
import torch.fx

from lora_fx import patterns
from lora_fx.config import DUMMY_TARGET_MODULES, LoraConfig
from lora_fx.core.state import CAPTURE_META, SiteRecord, lora_tag
from lora_fx.errors import NoTargetMatchedError, UnsupportedSiteError
from lora_fx.math import quant
from lora_fx.sites import params as _param_sites
from lora_fx.sites import tokens as _token_sites
from lora_fx.sites.kinds import MATCHERS, kind_of
from lora_fx.sites.site import ConvSpec, Match, Site

__all__ = ["ConvSpec", "Site", "all_sites", "find_sites", "match_modules_to_save", "pattern_key"]

# lora_fx's own pattern (not a user's): the first numbered component after two names.
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def all_sites(gm: torch.fx.GraphModule) -> dict[str, Site]:
    """Every site in the graph, by name, in graph order (names no site can carry left out)."""
    return _sites_and_conflicts(gm)[0]


def _sites_and_conflicts(gm: torch.fx.GraphModule) -> tuple[dict[str, Site], dict[str, str]]:
    """The sites, and the names whose ops disagree (why, for an error if a config picks one)."""
    grouped: dict[str, list[Match]] = {}
    for node in gm.graph.nodes:
        if lora_tag(node) is not None:
            continue
        for matcher in MATCHERS:
            match = matcher(gm, node)
            if match is not None:
                for one in match if isinstance(match, tuple) else (match,):
                    grouped.setdefault(one.fqn, []).append(one)
                break
    sites, conflicts = {}, {}
    for fqn, matches in grouped.items():
        reason = _disagreement(fqn, matches)
        if reason is None:
            sites[fqn] = _group(fqn, matches)
        else:
            conflicts[fqn] = reason
    sites.update(_param_sites.recorded_param_sites(gm))
    sites.update(_token_sites.recorded_token_sites(gm, sites))
    return sites, conflicts


def find_sites(gm: torch.fx.GraphModule, cfg: LoraConfig) -> list[Site]:
    """The sites `cfg` selects, following PEFT's matching rules.

    Raises:
        NoTargetMatchedError: `target_modules` selects no site (a few candidate names are listed).
    """
    sites, conflicts = _sites_and_conflicts(gm)
    _refuse_conflicts(cfg, conflicts)
    targets = cfg.target_parameters
    params = _param_sites.find_param_sites(gm, targets) if targets else []
    tokens = _token_sites.find_token_sites(gm, cfg, sites)
    if (cfg.target_modules is None and (params or tokens)) or (
        cfg.target_modules == DUMMY_TARGET_MODULES  # PEFT's "no LoRA module" (tokens alone)
    ):
        sites = {}
    elif cfg.target_modules is None:
        raise NoTargetMatchedError(
            "target_modules is None; name the sites to adapt, e.g. "
            f"target_modules={_short_names(sites)[:4]!r} or 'all-linear'"
        )
    output_layer = gm.meta.get(CAPTURE_META, {}).get("output_layer")
    excluded_any = False
    chosen = []
    for fqn, site in sites.items():
        kind = kind_of(site)
        if not kind.matchers:
            continue  # a kind found by name, not by op (parameter sites: target_parameters only)
        name = kind.target_name(site)  # an MHA's nested out_proj goes with the MHA
        if cfg.is_all_linear:  # PEFT's: Linear / Conv1D modules (and MHAs) but the output layer
            wanted = kind.in_all_linear(site) and fqn != output_layer
        else:
            wanted = _target_matches(cfg, name)
        if not wanted or _in_modules_to_save(cfg, name):
            continue
        if cfg.exclude_modules and _name_matches(cfg.exclude_modules, name):
            excluded_any = True
            continue
        chosen.append(site)
    if cfg.exclude_modules and not excluded_any:
        warnings.warn(f"exclude_modules={cfg.exclude_modules!r} matched no site", stacklevel=3)
    chosen += params
    if chosen and isinstance(cfg.target_modules, (list, tuple, set)) and not cfg.is_all_linear:
        _warn_unmatched_entries(cfg.target_modules, sites)
    if not chosen and not tokens:
        kinds = sorted({s.kind for s in sites.values()})
        raise NoTargetMatchedError(
            f"target_modules={cfg.target_modules!r} matched no site "
            f"(layers_to_transform={cfg.layers_to_transform!r}); "
            f"sites in this graph ({', '.join(kinds)}): "
            f"{list(sites)[:6]!r}{' ...' if len(sites) > 6 else ''}"
        )
    for site in chosen:
        _check_site(site, cfg)
        _check_weight(gm, site, cfg)
    _refuse_token_overlap(tokens, chosen)
    return chosen + tokens


def match_modules_to_save(gm: torch.fx.GraphModule, names: list[str]) -> list[str]:
    """Module paths that `modules_to_save` selects (PEFT matches with a plain `endswith`).

    Raises:
        NoTargetMatchedError: A name matches no module that holds parameters.
    """
    holders = [
        path
        for path, module in gm.named_modules()
        if path
        and any(True for _ in module.parameters(recurse=False))
        and ".lora_" not in path
        and ".modules_to_save." not in path
    ]
    chosen: list[str] = []
    for name in names:
        hits = [p for p in holders if p.endswith(name)]
        if not hits:
            # A container whose children hold the parameters (a classifier head) also counts.
            hits = [p for p, _ in gm.named_modules() if p and p.endswith(name) and p not in chosen]
        if not hits:
            raise NoTargetMatchedError(
                f"modules_to_save entry {name!r} matched no module; "
                f"modules with parameters: {holders[:6]!r}"
            )
        chosen += [h for h in hits if h not in chosen]
    # A module inside another chosen one travels with it.
    return [p for p in chosen if not any(p.startswith(q + ".") for q in chosen)]


def _refuse_token_overlap(tokens: list[Site], chosen: list[Site]) -> None:
    """An embedding is a LoRA target or a trainable-tokens one, not both (PEFT nests them)."""
    tables = {t.fqn.removesuffix(_token_sites.SUFFIX) for t in tokens}
    both = sorted(tables & {s.fqn for s in chosen})
    if both:
        raise UnsupportedSiteError(
            f"{both} are both LoRA targets (target_modules) and trainable_token_indices "
            "targets; choose one of the two for each embedding"
        )


def _check_site(site: Site, cfg: LoraConfig) -> None:
    """Reject a site the config cannot adapt, naming it; the kind's flags say what it can carry."""
    kind, record = kind_of(site), SiteRecord.from_config(cfg, pattern_key(site), site.kind)
    r, init = record.r, cfg.init_lora_weights
    reason = kind.refuse(site, r, cfg.use_dora)
    if reason is not None:
        raise UnsupportedSiteError(reason)
    asked = {
        "use_dora=True": cfg.use_dora and not kind.can.dora,
        "lora_bias=True": cfg.lora_bias and not kind.can.lora_bias,
        f"lora_dropout={cfg.lora_dropout}": cfg.lora_dropout > 0 and not kind.can.dropout,
        "kasa_config": cfg.kasa_config is not None and not kind.can.kasa,
        "velora_config": cfg.velora_config is not None and not kind.can.velora,
        "use_bdlora": cfg.use_bdlora is not None and not kind.can.bdlora,
        "alora_invocation_tokens (aLoRA, linear sites only as in PEFT)": (
            cfg.alora_invocation_tokens is not None and not kind.can.alora
        ),
        "use_qalora=True": cfg.use_qalora and not kind.can.qalora,
        "monteclora_config": cfg.monteclora_config is not None and not kind.can.monteclora,
    }
    for what, refused in asked.items():
        if refused:
            raise UnsupportedSiteError(
                f"{what} is not supported on {kind.label} {site.fqn!r}"
                + kind.refusal_note.format(weight=site.weight)
            )
    if cfg.lora_dropout > 0 and kind.can.branch_at == "weight_read":
        warnings.warn(
            f"lora_dropout={cfg.lora_dropout} is not applied on {kind.label} {site.fqn!r}: its "
            "delta is added to the weight where read, which leaves no input to drop (PEFT's "
            "MultiheadAttention ignores it too)",
            stacklevel=4,
        )
    if isinstance(init, str) and init != "gaussian" and not kind.can.base_inits:
        raise UnsupportedSiteError(
            f"init_lora_weights={init!r} is not supported on {kind.label} {site.fqn!r}"
            + kind.refusal_note.format(weight=site.weight)
            + f"; {init!r} needs a linear site; {site.fqn!r} is a {site.kind} site "
            "(use True, False or 'gaussian' there, or exclude it)"
        )
    if cfg.kasa_config is not None:
        _check_kasa_site(site, r)
    if cfg.use_bdlora is not None:
        _check_bdlora_site(site, record, strict=cfg.use_bdlora["match_strict"])
    if cfg.use_qalora and site.in_features % cfg.qalora_group_size:
        raise UnsupportedSiteError(
            f"use_qalora=True needs in_features divisible by qalora_group_size; site "
            f"{site.fqn!r} has in_features={site.in_features}, qalora_group_size="
            f"{cfg.qalora_group_size}; choose a group size that divides it, or exclude the site"
        )
    if init == "orthogonal" and r % 2:
        raise UnsupportedSiteError(
            f"init_lora_weights='orthogonal' needs an even rank; site {site.fqn!r} has r={r}"
        )
    if isinstance(init, str) and init not in ("gaussian", "orthogonal", "eva"):
        smallest = min(site.in_features, site.out_features)
        if r > smallest:
            raise UnsupportedSiteError(
                f"init_lora_weights={init!r} takes r singular / QR directions of the weight; site "
                f"{site.fqn!r} ({site.out_features}x{site.in_features}) has only {smallest}, "
                f"r={r} (PEFT silently shrinks the rank)"
            )


def _check_kasa_site(site: Site, r: int) -> None:
    """KaSA keeps `min(in, out) - r >= 1` directions of an `[out, in]` weight (PEFT's limits)."""
    if site.transposed:
        raise UnsupportedSiteError(
            f"kasa_config is not supported on site {site.fqn!r}, whose weight is stored [in, out] "
            "(transformers Conv1D; PEFT refuses fan_in_fan_out layers too); target nn.Linear sites"
        )
    smallest = min(site.in_features, site.out_features)
    if r >= smallest:
        raise UnsupportedSiteError(
            f"kasa_config needs r < min(in_features, out_features) so the truncated base weight "
            f"keeps a direction; site {site.fqn!r} ({site.out_features}x{site.in_features}) has "
            f"r={r}; use r <= {smallest - 1}"
        )


def _check_bdlora_site(site: Site, record: SiteRecord, *, strict: bool) -> None:
    """One block-diagonal factor per site (PEFT's substring rule), its sizes split in blocks."""
    side, blocks = record.block_diagonal, record.nblocks
    if side == "ab":
        raise UnsupportedSiteError(
            f"use_bdlora: site {site.fqn!r} matches both target_modules_bd_a and "
            "target_modules_bd_b (patterns match as substrings of the site name, as in PEFT)"
        )
    if not side and strict:
        raise UnsupportedSiteError(
            f"use_bdlora: site {site.fqn!r} matches neither target_modules_bd_a nor "
            "target_modules_bd_b; add it to one, or set match_strict=False to give it plain LoRA"
        )
    sizes = {"a": (site.in_features, record.r), "b": (record.r, site.out_features)}.get(side, ())
    if any(size % blocks for size in sizes):
        raise UnsupportedSiteError(
            f"use_bdlora nblocks={blocks} does not divide the block-diagonal {side.upper()} of "
            f"site {site.fqn!r} (in={sizes[0]}, out={sizes[1]}); choose r and nblocks to fit"
        )


_FULL_PRECISION_INITS = ("pissa", "loftq", "corda", "lora_ga")  # they read the dense weight


def _check_weight(gm: torch.fx.GraphModule, site: Site, cfg: LoraConfig) -> None:
    """A non-float base weight must be a bitsandbytes type lora_fx can read, on a linear site."""
    weight = gm.get_parameter(site.weight)
    kind = quant.quant_type(weight)
    if kind is None and (weight.is_floating_point() or weight.is_complex()):
        return
    init = cfg.init_lora_weights
    if kind is not None and cfg.kasa_config is not None:
        raise UnsupportedSiteError(
            f"kasa_config needs the full-precision weight of site {site.fqn!r}, which is {kind}; "
            "inject before lora_fx.quantize"
        )
    if kind is not None and cfg.monteclora_config is not None:
        raise UnsupportedSiteError(
            f"monteclora_config is not supported on site {site.fqn!r}, whose weight is {kind} "
            "(PEFT's quantized layers have no MonteCLoRA)"
        )
    if kind is not None and cfg.velora_config is not None:
        raise UnsupportedSiteError(
            f"velora_config is not supported on site {site.fqn!r}, whose weight is {kind} "
            "(PEFT's quantized layers refuse VeLoRA too)"
        )
    if kind is not None and isinstance(init, str) and init.startswith(_FULL_PRECISION_INITS):
        raise UnsupportedSiteError(
            f"init_lora_weights={init!r} needs the full-precision weight of site {site.fqn!r}, "
            f"which is {kind}; inject before lora_fx.quantize (as PEFT asks)"
        )
    supported = f"supported quantized sites: linear with {list(quant.SUPPORTED_QUANT_TYPES)}"
    if kind is None:
        raise UnsupportedSiteError(
            f"site {site.fqn!r} has a {weight.dtype} weight of type {type(weight).__name__}, "
            f"not a bitsandbytes one; {supported} (bitsandbytes Linear4bit / Linear8bitLt)"
        )
    if kind not in quant.SUPPORTED_QUANT_TYPES or not kind_of(site).can.quantized:
        raise UnsupportedSiteError(
            f"site {site.fqn!r} is a {site.kind} site with a {kind!r} quantized weight; {supported}"
        )


def _target_matches(cfg: LoraConfig, fqn: str) -> bool:
    """PEFT's `check_target_module_exists` for target_modules and layers_to_transform."""
    targets = cfg.target_modules
    if isinstance(targets, str):
        return patterns.fullmatch(targets, fqn, field="target_modules")
    if fqn in targets:
        return True  # an exact name is taken as it is, whatever layers_to_transform says (as PEFT)
    if not any(fqn.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(fqn, cfg.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _layer_index(fqn: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first numbered path segment, optionally after one of `layers_pattern`."""
    if not layers_pattern:
        match = _LAYER_INDEX.match(fqn)
        return int(match["idx"]) if match else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        index = patterns.layer_index(pattern, fqn, field="layers_pattern")
        if index is not None:
            return index
    return None


def _name_matches(names: list[str] | str, fqn: str, field: str = "exclude_modules") -> bool:
    """A str is a full-match regex; a list entry matches exactly or as a dotted suffix."""
    if isinstance(names, str):
        return patterns.fullmatch(names, fqn, field=field)
    return fqn in names or any(fqn.endswith(f".{n}") for n in names)


def _in_modules_to_save(cfg: LoraConfig, fqn: str) -> bool:
    """PEFT never puts an adapter on (or inside) a modules_to_save module."""
    return any(
        patterns.module_match(m, fqn, field="modules_to_save") for m in cfg.modules_to_save or ()
    )


def _warn_unmatched_entries(targets: Iterable[str], sites: dict[str, Site]) -> None:
    """A typo in one of several names (`q_prj`) would silently adapt only the others: say so."""
    unmatched = [t for t in targets if not any(_name_matches([t], fqn) for fqn in sites)]
    if not unmatched:
        return
    names = _short_names(sites)
    hints = {t: difflib.get_close_matches(t.rsplit(".", 1)[-1], names, n=2) for t in unmatched}
    said = ", ".join(f"{t!r} (did you mean {h}?)" if h else repr(t) for t, h in hints.items())
    warnings.warn(
        f"target_modules entries matched no site and were ignored: {said}; "
        f"site names in this graph end in: {names[:8]!r}",
        stacklevel=4,
    )


def _short_names(sites: dict[str, Site]) -> list[str]:
    """Distinct last name components of sites, for suggestions."""
    return list(dict.fromkeys(fqn.rsplit(".", 1)[-1] for fqn in sites))


def pattern_key(site: Site) -> str:
    """The name `rank_pattern` / `alpha_pattern` keys match (PEFT's `current_key`).

    The module path, or for parameter sites the parameter's path (`...experts.gate_up_proj`).
    """
    kind = kind_of(site)
    return kind.target_name(site) if kind.matchers else site.weight


def _refuse_conflicts(cfg: LoraConfig, conflicts: dict[str, str]) -> None:
    """A name whose ops disagree fails only a config that selects it (never an unrelated one)."""
    for fqn, reason in conflicts.items():
        if not cfg.is_all_linear and cfg.target_modules is not None and _target_matches(cfg, fqn):
            raise UnsupportedSiteError(reason)


def _disagreement(fqn: str, matches: list[Match]) -> str | None:
    """Why the matches of one name cannot be one site (kind, weight or shape differ), or None."""
    first = matches[0]
    for other in matches[1:]:
        if (other.kind, other.weight, other.in_features, other.out_features) != (
            first.kind,
            first.weight,
            first.in_features,
            first.out_features,
        ):
            return (
                f"site {fqn!r} is reached by ops on different weights: {first.node.format_node()} "
                f"and {other.node.format_node()}"
            )
    return None


def _group(fqn: str, matches: list[Match]) -> Site:
    """One site from the matches of one name (they agree: `_disagreement`)."""
    first = matches[0]
    return Site(
        fqn=fqn,
        kind=first.kind,
        nodes=tuple(m.node for m in matches),
        inputs=tuple(m.input for m in matches),
        weight=first.weight,
        bias=first.bias,
        in_features=first.in_features,
        out_features=first.out_features,
        transposed=first.transposed,
        conv=first.conv,
        padding_idx=first.padding_idx,
        module=any(m.module for m in matches),
    )
