"""1. Mixed batch, eager: one forward of rows for four adapters vs one adapter at a time;
the switch costs."""

from __future__ import annotations

import copy
import gc
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import logits, median_ms, ratios, spread, table, timed
from bench_core import VOCAB
from torch import nn

import lora_fx

from .shared import SEQ, gap, peft_config

__all__ = [
    "ADAPTERS",
    "BATCH",
    "PER_ADAPTER",
    "bench_eager",
    "bench_switch",
    "branch_flops",
    "build_mixed",
    "check_mixed",
    "compositions",
    "mixed_variants",
    "report_mixed",
    "row_index",
]

PER_ADAPTER = 8
# name -> (r, lora_alpha): one adapter at another rank, so the mixed graph is not uniform.
ADAPTERS = {"cat": (8, 16), "dog": (8, 16), "fox": (8, 16), "owl": (16, 16)}
BATCH = PER_ADAPTER * len(ADAPTERS)

_EAGER = ("hf_base", "fx_base", "fx_mixed", "fx_seq", "fx_seq_graphs", "peft_mixed", "peft_seq")
_EAGER_DOC = {
    "hf_base": "HF model, no adapter, 32 rows",
    "fx_base": "captured graph, no adapter, 32 rows",
    "fx_mixed": "set_adapter_batch + 1 forward of 32",
    "fx_seq": "4 x (set_adapter + forward of 8), dynamic-batch graph",
    "fx_seq_graphs": "4 graphs (batch 8, one adapter each) x forward of 8",
    "peft_mixed": "adapter_names=..., 1 forward of 32",
    "peft_seq": "4 x (set_adapter + forward of 8)",
}
_RATIOS = (
    ("fx_mixed/peft_mixed", "fx_mixed", "peft_mixed"),
    ("fx_mixed/fx_seq", "fx_mixed", "fx_seq"),
    ("fx_mixed/fx_seq_graphs", "fx_mixed", "fx_seq_graphs"),
    ("peft_mixed/peft_seq", "peft_mixed", "peft_seq"),
    ("fx_seq/peft_seq", "fx_seq", "peft_seq"),
    ("fx_mixed/fx_base", "fx_mixed", "fx_base"),
    ("peft_mixed/hf_base", "peft_mixed", "hf_base"),
)


def compositions(count: int, seed: int = 0) -> list[list[str]]:
    """`count` row orders of an 8/8/8/8 split; the first is sorted, the rest shuffled."""
    rows = [name for name in ADAPTERS for _ in range(PER_ADAPTER)]
    rng = random.Random(seed)
    out = [rows]
    for _ in range(count - 1):
        rows = rows[:]
        rng.shuffle(rows)
        out.append(rows)
    return out


def row_index(comp: list[str]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([i for i, n in enumerate(comp) if n == name]) for name in ADAPTERS}


def build_mixed(base: nn.Module, fx_model: nn.Module, ids: torch.Tensor, folder: Path) -> dict:
    """PEFT with the 4 adapters (saved to `folder`) and the lora_fx graphs loading them."""
    from peft import get_peft_model

    pm = None
    for k, (name, (r, alpha)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + k)
        if pm is None:
            pm = get_peft_model(copy.deepcopy(base), peft_config(r, alpha), name)
        else:
            pm.add_adapter(name, peft_config(r, alpha))
    pm.eval().save_pretrained(folder)  # one subfolder per adapter

    kw = {"use_cache": False}
    capture_s: dict[str, float] = {}
    capture_s["static_32"], fx_base = timed(lambda: lora_fx.capture(fx_model, (ids,), kw))
    gm_mixed = lora_fx.capture(fx_model, (ids,), kw)
    batch = torch.export.Dim("batch", min=1, max=BATCH)
    dynamic = {"input_ids": {0: batch}, "use_cache": None}
    capture_s["dynamic"], gm_seq = timed(
        lambda: lora_fx.capture(fx_model, (ids,), kw, dynamic_shapes=dynamic)
    )
    capture_s["static_8"], gm8 = timed(lambda: lora_fx.capture(fx_model, (ids[:PER_ADAPTER],), kw))
    load_s = []
    for name in ADAPTERS:
        for gm in (gm_mixed, gm_seq):
            seconds, _ = timed(
                lambda gm=gm, name=name: lora_fx.load_adapter(gm, folder / name, name)
            )
            load_s.append(seconds)
    per_adapter = {
        name: lora_fx.load_adapter(copy.deepcopy(gm8), folder / name, name) for name in ADAPTERS
    }
    for gm in (fx_base, gm_mixed, gm_seq, *per_adapter.values()):
        gm.eval()
    return {
        "pm": pm,
        "fx_base": fx_base,
        "gm_mixed": gm_mixed,
        "gm_seq": gm_seq,
        "per_adapter": per_adapter,
        "capture_s": capture_s,
        "load_adapter_ms": median_ms(load_s),
    }


def mixed_variants(base: nn.Module, m: dict) -> dict[str, Callable]:
    """The eager variants: fn(ids, comp, rows) -> logits [32, seq, vocab]."""
    pm, gm_mixed, gm_seq, per_adapter = m["pm"], m["gm_mixed"], m["gm_seq"], m["per_adapter"]

    def fx_mixed(ids, comp, rows):
        lora_fx.set_adapter_batch(gm_mixed, comp)
        return logits(gm_mixed(ids))

    def fx_seq(ids, comp, rows):
        out = torch.empty(BATCH, SEQ, VOCAB)
        for name, index in rows.items():
            lora_fx.set_adapter(gm_seq, name)
            out[index] = logits(gm_seq(ids[index]))
        return out

    def fx_seq_graphs(ids, comp, rows):
        out = torch.empty(BATCH, SEQ, VOCAB)
        for name, index in rows.items():
            out[index] = logits(per_adapter[name](ids[index]))
        return out

    def peft_seq(ids, comp, rows):
        out = torch.empty(BATCH, SEQ, VOCAB)
        for name, index in rows.items():
            pm.set_adapter(name)
            out[index] = pm(input_ids=ids[index], use_cache=False).logits
        return out

    return {
        "hf_base": lambda ids, comp, rows: base(input_ids=ids, use_cache=False).logits,
        "fx_base": lambda ids, comp, rows: logits(m["fx_base"](ids)),
        "fx_mixed": fx_mixed,
        "fx_seq": fx_seq,
        "fx_seq_graphs": fx_seq_graphs,
        "peft_mixed": lambda ids, comp, rows: (
            pm(input_ids=ids, adapter_names=comp, use_cache=False).logits
        ),
        "peft_seq": peft_seq,
    }


def check_mixed(variants: dict[str, Callable], ids: torch.Tensor, comp: list[str]) -> dict:
    """Max |logit| gaps that must be ~0, and one that must not (so the rest mean something)."""
    with torch.no_grad():
        out = {name: fn(ids, comp, row_index(comp)) for name, fn in variants.items()}
    pairs = {
        "adapters_change_output (must be >0)": ("fx_mixed", "fx_base"),
        "fx_mixed_vs_peft_mixed": ("fx_mixed", "peft_mixed"),
        "fx_seq_vs_fx_mixed": ("fx_seq", "fx_mixed"),
        "fx_seq_graphs_vs_fx_mixed": ("fx_seq_graphs", "fx_mixed"),
        "peft_seq_vs_peft_mixed": ("peft_seq", "peft_mixed"),
        "fx_base_vs_hf_base": ("fx_base", "hf_base"),
    }
    return {label: gap(out[a], out[b]) for label, (a, b) in pairs.items()}


def bench_eager(
    variants: dict[str, Callable],
    ids: torch.Tensor,
    comps: list[list[str]],
    *,
    budget_s: float,
    min_rounds: int,
) -> dict[str, Any]:
    """Interleaved rounds of one call per variant; the composition changes every round."""
    rng = random.Random(0)
    names = list(variants)
    rows = [row_index(c) for c in comps]
    with torch.no_grad():
        for k in range(2):  # warm-up: allocator, first-call paths
            for fn in variants.values():
                fn(ids, comps[k], rows[k])
        round_s, _ = timed(lambda: [fn(ids, comps[0], rows[0]) for fn in variants.values()])
        n_rounds = max(min_rounds, min(400, int(budget_s / round_s)))
        samples: dict[str, list[float]] = {name: [] for name in names}
        gc.collect()
        gc.disable()
        try:
            for i in range(n_rounds):
                comp, index = comps[i % len(comps)], rows[i % len(comps)]
                rng.shuffle(names)
                for name in names:
                    start = time.perf_counter()
                    variants[name](ids, comp, index)
                    samples[name].append(time.perf_counter() - start)
        finally:
            gc.enable()
    return {
        "rounds": n_rounds,
        "median_ms": {name: median_ms(samples[name]) for name in variants},
        "ratios": ratios(samples, _RATIOS),
    }


def bench_switch(m: dict, comps: list[list[str]], repeats: int) -> dict[str, float]:
    """Median ms of each switch, alternating lora_fx and PEFT."""
    gm, pm = m["gm_seq"], m["pm"]
    names = list(ADAPTERS)
    fx_set, fx_comp, fx_enter, fx_leave, peft_set = [], [], [], [], []
    for i in range(repeats):
        name = names[i % len(names)]
        fx_set.append(timed(lambda name=name: lora_fx.set_adapter(gm, name))[0])
        peft_set.append(timed(lambda name=name: pm.set_adapter(name))[0])
        fx_enter.append(timed(lambda: lora_fx.set_adapter_batch(gm, comps[0]))[0])
        comp = comps[1 + i % (len(comps) - 1)]
        fx_comp.append(timed(lambda comp=comp: lora_fx.set_adapter_batch(gm, comp))[0])
        fx_leave.append(timed(lambda: lora_fx.set_adapter_batch(gm, None))[0])
    return {
        "repeats": repeats,
        "graph_nodes_single": len(gm.graph.nodes),
        "fx_set_adapter_ms": median_ms(fx_set),
        "fx_new_composition_ms": median_ms(fx_comp),
        "fx_enter_mixed_ms": median_ms(fx_enter),
        "fx_leave_mixed_ms": median_ms(fx_leave),
        "peft_set_adapter_ms": median_ms(peft_set),
    }


def branch_flops(pm: nn.Module) -> dict[str, float]:
    """Per-token branch FLOPs: one adapter per row (PEFT, fx_seq), one adapter per row at the
    site's largest rank (fx mixed gathers zero-padded stacks), every adapter on every row."""
    from peft.tuners.lora import LoraLayer

    per_adapter = dict.fromkeys(ADAPTERS, 0)
    site = padded = 0
    for layer in (m for m in pm.modules() if isinstance(m, LoraLayer)):
        site += 2 * layer.in_features * layer.out_features
        padded += 2 * max(layer.r[n] for n in ADAPTERS) * (layer.in_features + layer.out_features)
        for name in ADAPTERS:
            per_adapter[name] += 2 * layer.r[name] * (layer.in_features + layer.out_features)
    own = statistics.mean(per_adapter.values())  # each adapter has PER_ADAPTER rows
    return {
        "own_adapter_per_token": own,
        "all_adapters_per_token": sum(per_adapter.values()),
        "own_vs_sites": own / site,
        "padded_vs_sites": padded / site,
        "all_vs_sites": sum(per_adapter.values()) / site,
    }


def report_mixed(mixed: dict[str, Any]) -> list[str]:
    e, c, sw, fl = mixed["eager"], mixed["checks"], mixed["switch"], mixed["flops"]
    peft_ms = e["median_ms"]["peft_mixed"]
    return [
        f"mixed batch, eager: {len(ADAPTERS)} adapters x {PER_ADAPTER} rows, seq {SEQ} "
        f"(no_grad; {e['rounds']} interleaved rounds, composition changes every round)",
        table(
            ["variant", "what", "median ms", "/ peft_mixed"],
            [
                [n, _EAGER_DOC[n], f"{e['median_ms'][n]:.1f}", f"{e['median_ms'][n] / peft_ms:.2f}"]
                for n in _EAGER
            ],
        ),
        "",
        "ratios: median of per-round ratios [p25-p75]",
        table(
            ["ratio", "value"],
            [[label, spread(e["ratios"][label], places=2)] for label, _, _ in _RATIOS],
        ),
        "",
        f"switch costs, median ms of {sw['repeats']} (graph of {sw['graph_nodes_single']} nodes "
        "with one adapter active)",
        table(
            [
                "fx set_adapter",
                "fx new composition",
                "fx enter mixed",
                "fx leave mixed",
                "peft set_adapter",
            ],
            [
                [
                    f"{sw[k]:.2f}"
                    for k in (
                        "fx_set_adapter_ms",
                        "fx_new_composition_ms",
                        "fx_enter_mixed_ms",
                        "fx_leave_mixed_ms",
                        "peft_set_adapter_ms",
                    )
                ]
            ],
        ),
        "",
        "branch FLOPs per token vs the adapted sites' own FLOPs: own adapter only (PEFT mixed, "
        f"sequential) {100 * fl['own_vs_sites']:.2f}%; own adapter at the largest rank (fx mixed, "
        f"gathered) {100 * fl['padded_vs_sites']:.2f}%; every adapter on every row (the masked "
        f"layout before issue 19) {100 * fl['all_vs_sites']:.2f}%",
        "max |logit| differences: " + "; ".join(f"{k} {v:.1e}" for k, v in c.items()),
    ]
