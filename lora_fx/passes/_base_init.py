"""Apply an `init_lora_weights` computed from the base weight to one site (`math/inits.py` math).

    A, B <- init(W);  W <- W - scale * B @ A   (PiSSA, OLoRA)  |  W <- deQ(Q(...))  (LoftQ)
    A, B <- init(W);  W unchanged              (MiCA, orthogonal)

Rules:
1. A and B are written in place into the adapter's registered tensors; the base weight is
   rewritten in place (a quantized one re-quantized), so the captured model sees it too (PEFT).
2. `inject` keeps the base weight for its rollback before this runs (`_rollback.Undo.keep`).
"""

from __future__ import annotations

import warnings

import torch

from lora_fx.config import LoraConfig
from lora_fx.core import graph as _graph
from lora_fx.core.state import SiteRecord
from lora_fx.math import quant
from lora_fx.math.inits import loftq, mica, olora, orthogonal, pissa
from lora_fx.sites import Site
from lora_fx.sites.kinds import lora_paths

__all__ = ["init_from_base", "write_init"]


def init_from_base(
    gm: torch.fx.GraphModule, site: Site, adapter: str, record: SiteRecord, cfg: LoraConfig
) -> bool:
    """Apply `cfg.init_lora_weights` to one site's A, B (and base weight); True if it acted."""
    init = cfg.init_lora_weights
    if not isinstance(init, str) or init == "gaussian":
        return False
    paths = lora_paths(site.kind, site.fqn, adapter)
    lora_a, lora_b = _graph.get_attr(gm, paths.a), _graph.get_attr(gm, paths.b)
    weight = _graph.get_attr(gm, site.weight)
    module = gm.get_submodule(site.nodes[0].target) if site.nodes[0].op == "call_module" else None
    with torch.no_grad():
        if init == "orthogonal":
            a, b = orthogonal(record.r, site.in_features, site.out_features)
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
            return True
        dense = quant.dequantize(weight, module) if quant.is_quantized(weight) else weight
        w = dense.detach().float()
        w = w.T if site.transposed else w  # [out, in]
        if init == "mica":  # the base weight stays as it is
            a, b = mica(w, record.r)
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
            return True
        if init == "olora":
            new_w, a, b = olora(w, record.r, record.scale)
        elif init == "loftq":
            bits, steps = cfg.loftq_config["loftq_bits"], cfg.loftq_config["loftq_iter"]
            new_w, a, b = loftq(w, record.r, bits=bits, steps=steps)
            if record.scale != 1:
                warnings.warn(
                    f"LoftQ on {site.fqn!r}: scale lora_alpha / r = {record.scale:g}; like PEFT, "
                    "LoftQ's A and B ignore it, so base + adapter approximates the original weight "
                    "only with lora_alpha == r",
                    stacklevel=4,
                )
        else:
            niter = int(init.split("_niter_")[1]) if "_niter_" in init else None
            new_w, a, b = pissa(w, record.r, record.scale, niter=niter)
    write_init(gm, site, adapter, a, b, new_w)
    return True


def write_init(
    gm: torch.fx.GraphModule,
    site: Site,
    adapter: str,
    a: torch.Tensor,
    b: torch.Tensor,
    new_w: torch.Tensor,
) -> None:
    """Write A `[r, in]`, B `[out, r]` and the new base weight `[out, in]` of one site, in place."""
    paths = lora_paths(site.kind, site.fqn, adapter)
    lora_a, lora_b = _graph.get_attr(gm, paths.a), _graph.get_attr(gm, paths.b)
    weight = _graph.get_attr(gm, site.weight)
    module = gm.get_submodule(site.nodes[0].target) if site.nodes[0].op == "call_module" else None
    new_w = new_w.T if site.transposed else new_w
    with torch.no_grad():
        lora_a.copy_(a.to(lora_a.dtype))
        lora_b.copy_(b.to(lora_b.dtype))
        if quant.is_quantized(weight):
            quant.requantize_(weight, new_w, module)
        else:
            weight.copy_(new_w.to(weight.dtype))
