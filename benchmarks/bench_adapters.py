"""Many adapters on one graph, next to HF PEFT, in one run: mixed batches and hot-swap (issue 3).

    python benchmarks/bench_adapters.py               # full run (~5 min on 2 busy CPU cores)
    python benchmarks/bench_adapters.py --quick       # smoke: 1 layer, few repeats (~2 min)
    python benchmarks/bench_adapters.py --out x.json  # default results/bench_adapters.json
    python benchmarks/bench_adapters.py --backend inductor   # compile figures with inductor
    python benchmarks/bench_adapters.py --no-compile  # eager figures only

Model: LlamaForCausalLM from config (hidden 256, intermediate 512, heads 4/2, vocab 1024, 4 layers),
target_modules="all-linear". Adapters cat, dog, fox: r=8, lora_alpha=16; owl: r=16, lora_alpha=16
(names that are no substring of PEFT's "lora_" prefix, which PEFT warns about).

Figures:
1. Mixed batch, eager (no_grad, eval): 4 adapters x 8 samples, a batch of 32 x seq 32. The row order
   of the composition changes every round (a shuffled 8/8/8/8 split), as a server's would.
   - fx_mixed: `set_adapter_batch(gm, names)` (same batch size: only the mask buffer is written)
     and one forward of 32 rows. Every adapter's branch runs on every row and is masked per row,
     so its branch FLOPs are those of all 4 adapters (printed beside the table).
   - fx_seq: per adapter, `set_adapter(gm, name)` (a graph rewrite and recompile) and a forward of
     its 8 rows. `capture` specialises the batch size, so this graph is captured with
     `dynamic_shapes={"input_ids": {0: Dim("batch")}, "use_cache": None}` (export wants every
     argument named, the bound `use_cache` included): one graph runs sub-batches of any size, so
     an uneven split works too.
   - fx_seq_graphs: the compute of fx_seq without switching: four graphs captured at batch 8, each
     with one adapter active, each running its 8 rows.
   - peft_mixed: PEFT's `model(input_ids, adapter_names=names)` on the 32 rows.
   - peft_seq: per adapter, `model.set_adapter(name)` (a flag) and a forward of its 8 rows.
   - hf_base / fx_base: the model without adapters on the 32 rows (eager HF / captured graph).
   Switch costs are timed apart: lora_fx `set_adapter`, a new composition, entering and leaving
   mixed mode; PEFT `set_adapter`.
2. Mixed batch under `torch.compile` (`--backend`, default aot_eager; inductor takes minutes per
   compile on 2 cores): the time of the first call on each new composition and the number of new
   dynamo graphs (`counters["stats"]["unique_graphs"]`). lora_fx runs new compositions with
   `torch._dynamo.config.error_on_recompile = True`; PEFT recompiles per composition (its
   `adapter_names` list is guarded as a constant), so it gets fewer of them (`--peft-compositions`).
3. Hot-swap: `load_adapter(gm, dir, hotswap=True)` into a slot prepared with
   `prepare_for_hotswap(gm, 16)` vs re-capturing (`capture` + `load_adapter`) vs PEFT's
   `hotswap_adapter` (after `prepare_model_for_compiled_hotswap(target_rank=16)`) vs PEFT's
   `PeftModel.from_pretrained` on a fresh copy (copy untimed). The adapters cycle through
   second (r=16, alpha 8), third (r=4, alpha 32) and first (r=8, alpha 16), so every swap changes
   rank and scale. Then under `torch.compile` with recompiles forbidden: swap time and first call
   after each swap, for both, and the cost of re-capturing and compiling anew instead.

Method:
1. One base model; PEFT copies it (`get_peft_model` injects in place) and lora_fx captures one other
   copy (graphs share its Parameters). PEFT adapters have random B (`init_lora_weights=False`) and
   are loaded into lora_fx with `load_adapter`, so every output is checked against PEFT's.
2. Eager variants run in interleaved rounds, in a shuffled order per round, one call each, with the
   garbage collector off; a ratio is the median over rounds of that round's ratio, with its
   25th-75th percentile range. Other timings are medians of repeats that alternate the sides.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import fill_defaults, logits, percentile, run_meta, table, timed, write_result
from bench_core import HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, VOCAB, llama

import lora_fx

PER_ADAPTER, SEQ = 8, 32
# name -> (r, lora_alpha): one adapter at another rank, so the mixed graph is not uniform.
ADAPTERS = {"cat": (8, 16), "dog": (8, 16), "fox": (8, 16), "owl": (16, 16)}
BATCH = PER_ADAPTER * len(ADAPTERS)
# Hot-swap: the slot is loaded with "first", padded to SWAP_RANK, then cycles through the others.
SWAPS = {"first": (8, 16), "second": (16, 8), "third": (4, 32)}
SWAP_ORDER = ("second", "third", "first")
SWAP_RANK, SWAP_BATCH = 16, 4
TARGETS = "all-linear"
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_adapters.json"

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


def peft_config(r: int, alpha: int) -> Any:
    import peft

    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)


def gap(out: Any, reference: torch.Tensor) -> float:
    """Max |logit| difference between a model output (or logits) and reference logits."""
    out = out if isinstance(out, torch.Tensor) else logits(out)
    return (out - reference).abs().max().item()


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def new_graphs(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """Seconds of one call, dynamo graphs it compiled, and its result."""
    before = counters["stats"]["unique_graphs"]
    seconds, result = timed(fn)
    return seconds, counters["stats"]["unique_graphs"] - before, result


@contextlib.contextmanager
def recompiles_forbidden() -> Iterator[None]:
    """`torch._dynamo.config.error_on_recompile = True` for the block."""
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = False


def guarded_call(fn: Callable[[], Any]) -> tuple[float, int, Any, str | None]:
    """`new_graphs(fn)`, with a recompile error caught and returned (then run without the ban)."""
    try:
        return (*new_graphs(fn), None)
    except torch._dynamo.exc.RecompileError as e:
        torch._dynamo.config.error_on_recompile = False
        return (*new_graphs(fn), f"RecompileError: {str(e).splitlines()[0][:120]}")


# ---------------------------------------------------------------------------- 1. mixed batch


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
    ratios = {}
    for label, num, den in _RATIOS:
        per_round = [n / d for n, d in zip(samples[num], samples[den], strict=True)]
        ratios[label] = {
            "median": statistics.median(per_round),
            "p25": percentile(per_round, 0.25),
            "p75": percentile(per_round, 0.75),
        }
    return {
        "rounds": n_rounds,
        "median_ms": {name: median_ms(samples[name]) for name in variants},
        "ratios": ratios,
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
    """Per-token branch FLOPs: one adapter per row (PEFT, fx_seq) vs every adapter on every row."""
    from peft.tuners.lora import LoraLayer

    per_adapter = dict.fromkeys(ADAPTERS, 0)
    site = 0
    for layer in (m for m in pm.modules() if isinstance(m, LoraLayer)):
        site += 2 * layer.in_features * layer.out_features
        for name in ADAPTERS:
            per_adapter[name] += 2 * layer.r[name] * (layer.in_features + layer.out_features)
    own = statistics.mean(per_adapter.values())  # each adapter has PER_ADAPTER rows
    return {
        "own_adapter_per_token": own,
        "all_adapters_per_token": sum(per_adapter.values()),
        "own_vs_sites": own / site,
        "all_vs_sites": sum(per_adapter.values()) / site,
    }


# ------------------------------------------------------------------- 2. compiled mixed batch


def bench_compiled_mixed(
    m: dict, ids: torch.Tensor, comps: list[list[str]], args: argparse.Namespace
) -> dict[str, Any]:
    """First call per new composition under torch.compile, lora_fx (recompiles banned) vs PEFT."""
    gm, pm = m["gm_mixed"], m["pm"]
    with torch.no_grad():
        reference = [
            pm(input_ids=ids, adapter_names=c, use_cache=False).logits
            for c in comps[: 1 + max(args.fx_compositions, args.peft_compositions)]
        ]
        torch._dynamo.reset()
        rows: list[dict[str, Any]] = []
        lora_fx.set_adapter_batch(gm, comps[0])
        fx = torch.compile(gm, backend=args.backend)
        for k in range(1 + args.fx_compositions):
            set_s, _ = timed(lambda k=k: lora_fx.set_adapter_batch(gm, comps[k]))
            with recompiles_forbidden() if k else contextlib.nullcontext():
                seconds, graphs, out, error = guarded_call(lambda: fx(ids))
            rows.append(_compiled_row("fx", k, set_s, seconds, graphs, error, out, reference[k]))
        peft_fn = torch.compile(pm, backend=args.backend)
        for k in range(1 + args.peft_compositions):
            seconds, graphs, out = new_graphs(
                lambda k=k: peft_fn(input_ids=ids, adapter_names=comps[k], use_cache=False)
            )
            rows.append(_compiled_row("peft", k, 0.0, seconds, graphs, None, out, reference[k]))
        steady = _steady(
            {
                "fx": lambda k: (lora_fx.set_adapter_batch(gm, comps[k]), fx(ids)),
                "peft": lambda k: peft_fn(input_ids=ids, adapter_names=comps[k], use_cache=False),
            },
            n_comps=1 + min(args.fx_compositions, args.peft_compositions),
            rounds=args.steady_rounds,
        )
    lora_fx.set_adapter_batch(gm, None)
    torch._dynamo.reset()
    return {"backend": args.backend, "calls": rows, "steady_ms": steady}


def _compiled_row(side, k, set_s, seconds, graphs, error, out, reference) -> dict[str, Any]:
    return {
        "side": side,
        "composition": k,
        "set_ms": 1e3 * set_s,
        "first_call_s": seconds,
        "new_graphs": graphs,
        "recompile_error": error,
        "max_abs_diff_vs_peft_eager": gap(out, reference),
    }


def _steady(fns: dict[str, Callable[[int], Any]], *, n_comps: int, rounds: int) -> dict:
    """Median ms per side over interleaved calls on compositions each side has compiled."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timed(lambda fn=fn, i=i: fn(i % n_comps))[0])
    return {name: median_ms(values) for name, values in samples.items()}


# ------------------------------------------------------------------------------ 3. hot-swap


def save_swap_adapters(base: nn.Module, ids: torch.Tensor, folder: Path) -> dict[str, Any]:
    """Save the hot-swap adapters with PEFT; return each one's eager PEFT logits."""
    from peft import get_peft_model

    reference = {}
    for k, (name, (r, alpha)) in enumerate(SWAPS.items()):
        torch.manual_seed(20 + k)
        pm = get_peft_model(copy.deepcopy(base), peft_config(r, alpha)).eval()
        pm.save_pretrained(folder / name)
        with torch.no_grad():
            reference[name] = pm(input_ids=ids, use_cache=False).logits
    return reference


def bench_hotswap_eager(
    base: nn.Module, fx_model: nn.Module, ids: torch.Tensor, folder: Path, repeats: int
) -> tuple[dict[str, Any], torch.fx.GraphModule, nn.Module]:
    """Median ms per swap, alternating the four ways; returns the prepared graph and PEFT model."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    kw = {"use_cache": False}
    gm = lora_fx.load_adapter(lora_fx.capture(fx_model, (ids,), kw), folder / "first").eval()
    fx_prepare_s, _ = timed(lambda: lora_fx.prepare_for_hotswap(gm, SWAP_RANK))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), folder / "first").eval()
    peft_prepare_s, _ = timed(lambda: prepare_model_for_compiled_hotswap(pm, target_rank=SWAP_RANK))
    s: dict[str, list[float]] = {
        k: [] for k in ("fx_hotswap", "fx_capture", "fx_load", "peft_hotswap", "peft_reload")
    }
    for i in range(repeats):
        path = folder / SWAP_ORDER[i % len(SWAP_ORDER)]
        s["fx_hotswap"].append(timed(lambda p=path: lora_fx.load_adapter(gm, p, hotswap=True))[0])
        seconds, fresh = timed(lambda: lora_fx.capture(fx_model, (ids,), kw))
        s["fx_capture"].append(seconds)
        s["fx_load"].append(timed(lambda p=path, g=fresh: lora_fx.load_adapter(g, p))[0])
        s["peft_hotswap"].append(timed(lambda p=path: hotswap_adapter(pm, str(p), "default"))[0])
        model = copy.deepcopy(base)
        seconds, fresh_pm = timed(lambda p=path, m=model: PeftModel.from_pretrained(m, p))
        s["peft_reload"].append(seconds)
        del fresh, model, fresh_pm
    recapture = [c + ld for c, ld in zip(s["fx_capture"], s["fx_load"], strict=True)]
    result = {
        "repeats": repeats,
        "fx_prepare_ms": 1e3 * fx_prepare_s,
        "peft_prepare_ms": 1e3 * peft_prepare_s,
        **{f"{k}_ms": median_ms(v) for k, v in s.items()},
        "fx_recapture_ms": median_ms(recapture),
        "last_adapter": SWAP_ORDER[(repeats - 1) % len(SWAP_ORDER)],
    }
    return result, gm, pm


def bench_hotswap_compiled(
    gm: torch.fx.GraphModule,
    pm: nn.Module,
    fx_model: nn.Module,
    ids: torch.Tensor,
    folder: Path,
    reference: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Swap + first call under torch.compile with recompiles banned, and re-capture + compile."""
    from peft.utils.hotswap import hotswap_adapter

    swaps = {
        "fx": lambda p: lora_fx.load_adapter(gm, p, hotswap=True),
        "peft": lambda p: hotswap_adapter(pm, str(p), "default"),
    }
    rows: list[dict[str, Any]] = []
    steady = {}
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = {
            "fx": torch.compile(gm, backend=args.backend),
            "peft": torch.compile(pm, backend=args.backend),
        }
        call = {
            "fx": lambda: compiled["fx"](ids),
            "peft": lambda: compiled["peft"](input_ids=ids, use_cache=False),
        }
        for side in ("fx", "peft"):
            swaps[side](folder / "first")
            seconds, graphs, out = new_graphs(call[side])
            rows.append(
                _swap_row(
                    side, "first (compile)", 0.0, seconds, graphs, None, out, reference["first"]
                )
            )
            with recompiles_forbidden():
                for name in SWAP_ORDER:
                    swap_s, _ = timed(lambda side=side, name=name: swaps[side](folder / name))
                    seconds, graphs, out, error = guarded_call(call[side])
                    rows.append(
                        _swap_row(side, name, swap_s, seconds, graphs, error, out, reference[name])
                    )
            steady[side] = median_ms([timed(call[side])[0] for _ in range(args.steady_rounds)])
        # Swapping by re-capturing: a new GraphModule is new code, so dynamo compiles it anew.
        capture_s, fresh = timed(lambda: lora_fx.capture(fx_model, (ids,), {"use_cache": False}))
        load_s, _ = timed(lambda: lora_fx.load_adapter(fresh, folder / "second"))
        fresh.eval()
        fresh_fn = torch.compile(fresh, backend=args.backend)
        compile_s, graphs, out = new_graphs(lambda: fresh_fn(ids))
    torch._dynamo.reset()
    return {
        "backend": args.backend,
        "calls": rows,
        "steady_ms": steady,
        "recapture": {
            "capture_s": capture_s,
            "load_s": load_s,
            "compile_first_call_s": compile_s,
            "total_s": capture_s + load_s + compile_s,
            "new_graphs": graphs,
            "max_abs_diff_vs_peft_eager": gap(out, reference["second"]),
        },
    }


def _swap_row(side, name, swap_s, seconds, graphs, error, out, reference) -> dict[str, Any]:
    return {
        "side": side,
        "adapter": name,
        "swap_ms": 1e3 * swap_s,
        "first_call_ms": 1e3 * seconds,
        "new_graphs": graphs,
        "recompile_error": error,
        "max_abs_diff_vs_peft_eager": gap(out, reference),
    }


def check_hotswap(gm, pm, reference: dict[str, torch.Tensor], last: str, ids) -> dict[str, float]:
    with torch.no_grad():
        return {
            "fx_hotswapped_vs_peft_eager": gap(gm(ids), reference[last]),
            "peft_hotswapped_vs_peft_eager": gap(
                pm(input_ids=ids, use_cache=False), reference[last]
            ),
            "swapped_adapter_changes_output (must be >0)": gap(
                reference[last], reference["first" if last != "first" else "second"]
            ),
        }


# ---------------------------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = llama(args.layers, seq=SEQ)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    swap_ids = ids[:SWAP_BATCH].clone()
    fx_model = copy.deepcopy(base)  # every captured graph shares this copy's Parameters
    comps = compositions(args.compositions)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        m = build_mixed(base, fx_model, ids, folder / "mixed")
        variants = mixed_variants(base, m)
        result["mixed"] = {
            "capture_s": m["capture_s"],
            "load_adapter_ms": m["load_adapter_ms"],
            "flops": branch_flops(m["pm"]),
            "checks": check_mixed(variants, ids, comps[1]),
            "eager": bench_eager(
                variants, ids, comps, budget_s=args.forward_seconds, min_rounds=args.min_rounds
            ),
            "switch": bench_switch(m, comps, args.switch_repeats),
        }
        lora_fx.set_adapter_batch(m["gm_mixed"], None)
        if args.compile:
            result["compiled_mixed"] = bench_compiled_mixed(m, ids, comps, args)
        del m, variants
        gc.collect()
        reference = save_swap_adapters(base, swap_ids, folder / "swap")
        eager, gm, pm = bench_hotswap_eager(
            base, fx_model, swap_ids, folder / "swap", args.swap_repeats
        )
        eager["checks"] = check_hotswap(gm, pm, reference, eager["last_adapter"], swap_ids)
        result["hotswap"] = eager
        if args.compile:
            result["hotswap_compiled"] = bench_hotswap_compiled(
                gm, pm, fx_model, swap_ids, folder / "swap", reference, args
            )
    return result


def _range(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} [{r['p25']:.2f}-{r['p75']:.2f}]"


def _err(row: dict[str, Any]) -> str:
    return "-" if row["recompile_error"] is None else "RecompileError"


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
        table(["ratio", "value"], [[label, _range(e["ratios"][label])] for label, _, _ in _RATIOS]),
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
        f"sequential) {100 * fl['own_vs_sites']:.2f}%; every adapter on every row (fx mixed, "
        f"masked) {100 * fl['all_vs_sites']:.2f}%",
        "max |logit| differences: " + "; ".join(f"{k} {v:.1e}" for k, v in c.items()),
    ]


def report_compiled_mixed(cm: dict[str, Any]) -> list[str]:
    return [
        f"mixed batch under torch.compile (backend {cm['backend']}; fx: new compositions with "
        "error_on_recompile=True)",
        table(
            [
                "side",
                "composition",
                "set ms",
                "first call s",
                "new graphs",
                "recompile error",
                "max|diff| vs peft eager",
            ],
            [
                [
                    r["side"],
                    str(r["composition"]) + (" (compile)" if r["composition"] == 0 else ""),
                    f"{r['set_ms']:.2f}",
                    f"{r['first_call_s']:.2f}",
                    str(r["new_graphs"]),
                    _err(r),
                    f"{r['max_abs_diff_vs_peft_eager']:.1e}",
                ]
                for r in cm["calls"]
            ],
        ),
        "steady compiled call, median ms (compositions already compiled): "
        + ", ".join(f"{k} {v:.1f}" for k, v in cm["steady_ms"].items()),
    ]


def report_hotswap(hs: dict[str, Any], hc: dict[str, Any] | None) -> list[str]:
    out = [
        f"hot-swap, eager: median ms of {hs['repeats']} swaps (second r16/a8 -> third r4/a32 -> "
        f"first r8/a16 ...), batch {SWAP_BATCH} x seq {SEQ}",
        table(
            ["operation", "ms"],
            [
                ["fx load_adapter(hotswap=True), prepared slot", f"{hs['fx_hotswap_ms']:.1f}"],
                ["fx re-capture: capture + load_adapter", f"{hs['fx_recapture_ms']:.1f}"],
                ["  of which capture", f"{hs['fx_capture_ms']:.1f}"],
                ["  of which load_adapter (inject + load)", f"{hs['fx_load_ms']:.1f}"],
                ["peft hotswap_adapter, prepared", f"{hs['peft_hotswap_ms']:.1f}"],
                ["peft from_pretrained on a fresh copy", f"{hs['peft_reload_ms']:.1f}"],
                ["fx prepare_for_hotswap (once)", f"{hs['fx_prepare_ms']:.1f}"],
                ["peft prepare_model_for_compiled_hotswap (once)", f"{hs['peft_prepare_ms']:.1f}"],
            ],
        ),
        "max |logit| differences: " + "; ".join(f"{k} {v:.1e}" for k, v in hs["checks"].items()),
    ]
    if hc is not None:
        rc = hc["recapture"]
        out += [
            "",
            f"hot-swap under torch.compile (backend {hc['backend']}; swaps with "
            "error_on_recompile=True)",
            table(
                [
                    "side",
                    "adapter",
                    "swap ms",
                    "first call ms",
                    "new graphs",
                    "recompile error",
                    "max|diff| vs peft eager",
                ],
                [
                    [
                        r["side"],
                        r["adapter"],
                        f"{r['swap_ms']:.1f}",
                        f"{r['first_call_ms']:.1f}",
                        str(r["new_graphs"]),
                        _err(r),
                        f"{r['max_abs_diff_vs_peft_eager']:.1e}",
                    ]
                    for r in hc["calls"]
                ],
            ),
            "steady compiled call, median ms: "
            + ", ".join(f"{k} {v:.1f}" for k, v in hc["steady_ms"].items()),
            f"fx swap by re-capture instead: capture {rc['capture_s']:.2f} s + load_adapter "
            f"{rc['load_s']:.2f} s + compile and first call {rc['compile_first_call_s']:.2f} s "
            f"= {rc['total_s']:.2f} s ({rc['new_graphs']} new graph(s); max|diff| vs peft eager "
            f"{rc['max_abs_diff_vs_peft_eager']:.1e})",
        ]
    return out


def report(result: dict[str, Any]) -> str:
    meta, cfg = result["meta"], result["config"]
    adapters = ", ".join(f"{n} r={r} alpha={a}" for n, (r, a) in ADAPTERS.items())
    out = [
        f"bench_adapters: lora_fx {meta['lora_fx']} vs peft {meta['peft']} | torch "
        f"{meta['torch']} | transformers {meta['transformers']} | {meta['threads']} thread(s)",
        f"LlamaForCausalLM {cfg['layers']} layers, hidden {HIDDEN}, intermediate {INTERMEDIATE}, "
        f"heads {HEADS}/{KV_HEADS}, vocab {VOCAB} | {TARGETS} | {adapters}",
        "",
        *report_mixed(result["mixed"]),
    ]
    if "compiled_mixed" in result:
        out += ["", *report_compiled_mixed(result["compiled_mixed"])]
    out += ["", *report_hotswap(result["hotswap"], result.get("hotswap_compiled"))]
    out += ["", f"total {meta['total_s']:.0f} s"]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 layer, few repeats")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; quick 1)")
    parser.add_argument("--forward-seconds", type=float, help="eager mixed-batch time budget")
    parser.add_argument("--min-rounds", type=int, help="eager mixed-batch rounds at least")
    parser.add_argument("--compositions", type=int, help="row orders the rounds rotate through")
    parser.add_argument("--switch-repeats", type=int, help="repeats of each switch")
    parser.add_argument("--swap-repeats", type=int, help="eager hot-swap repeats")
    parser.add_argument("--fx-compositions", type=int, help="new compositions, lora_fx compiled")
    parser.add_argument("--peft-compositions", type=int, help="new compositions, PEFT compiled")
    parser.add_argument("--steady-rounds", type=int, help="calls timed on each compiled model")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile figures"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)"
    )
    args = parser.parse_args(argv)
    quick = {
        "layers": 1,
        "forward_seconds": 2.0,
        "min_rounds": 4,
        "compositions": 4,
        "switch_repeats": 4,
        "swap_repeats": 3,
        "fx_compositions": 2,
        "peft_compositions": 1,
        "steady_rounds": 3,
    }
    full = {
        "layers": 4,
        "forward_seconds": 45.0,
        "min_rounds": 15,
        "compositions": 8,
        "switch_repeats": 12,
        "swap_repeats": 6,
        "fx_compositions": 3,
        "peft_compositions": 1,
        "steady_rounds": 10,
    }
    return fill_defaults(args, quick=quick, full=full)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Deprecation noise from transformers (PEFT calls it) and torch pytree (deepcopy of a graph).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    start = time.perf_counter()
    result = run(args)
    result = {
        "meta": run_meta(quick=args.quick, start=start),
        "config": {
            "model": "LlamaForCausalLM",
            "layers": args.layers,
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "vocab_size": VOCAB,
            "target_modules": TARGETS,
            "adapters": {n: {"r": r, "lora_alpha": a} for n, (r, a) in ADAPTERS.items()},
            "batch": BATCH,
            "rows_per_adapter": PER_ADAPTER,
            "seq": SEQ,
            "swap_adapters": {n: {"r": r, "lora_alpha": a} for n, (r, a) in SWAPS.items()},
            "swap_rank": SWAP_RANK,
            "swap_batch": SWAP_BATCH,
            **{k: v for k, v in vars(args).items() if k not in ("out", "quick", "threads")},
        },
        **result,
    }
    write_result(result, args.out, report)
    return result


if __name__ == "__main__":
    main()
