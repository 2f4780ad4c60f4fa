"""Merge at the bandwidth floor: lora_fx merge / unmerge / merge_and_unload next to HF PEFT.

    python benchmarks/bench_merge.py              # full run: 4 layers, 7 rounds, 2 runs (~5 min)
    python benchmarks/bench_merge.py --quick      # smoke mode: 1 layer, 2 rounds, 1 run (seconds)
    python benchmarks/bench_merge.py --runs 3     # repeat the whole measurement 3 times
    python benchmarks/bench_merge.py --out x.json # JSON path (default results/bench_merge.json)

Model: LlamaForCausalLM from config (hidden 1024, intermediate 2816, 16 heads, vocab 1024, random
weights, no download); adapter: PEFT `target_modules="all-linear"`, r=16, lora_alpha=32,
`init_lora_weights=False` (random B), its values rounded to bf16 so every variant folds the same
numbers. Float32 and bfloat16 bases; adapters are float32 in both (PEFT's and lora_fx's default
`autocast_adapter_dtype=True`).

Figures per dtype, per run (median over interleaved rounds; each round runs every variant once):
1. floor: `W.addmm_(B, A, alpha=scale)` over every site weight, in the weight's dtype (bf16 B, A
   for a bf16 W); and stream: `W.mul_(1)`, one read and one write of every site weight.
2. fx merge / unmerge: `lora_fx.merge(gm)` / `lora_fx.unmerge(gm)`, total (it also rewrites and
   recompiles the graph) and the fold part alone (time inside `_fold.fold` / `_fold.unfold`: the
   weight updates).
3. fx merge_and_unload (total and folds) on a fresh deep copy of the loaded graph (copy untimed).
4. PEFT `merge_adapter()` / `unmerge_adapter()`, and `merge_and_unload()` on a fresh deep copy.
Ratios are to the floor. Memory: the peak of bytes held by tensors allocated during the call,
from `torch.profiler` with `profile_memory=True` (allocations are booked at the start of the op
that makes them, frees at their time; scratch an op frees before it returns is not seen), run once
per variant outside the timed rounds. Rounding: `||written - exact|| / ||delta||` over all sites
(exact in float64) after one merge on fresh weights, for lora_fx, PEFT (float32 adapters, its
default) and PEFT with bf16 adapters (`autocast_adapter_dtype=False`: B @ A is rounded to bf16,
then the sum); the same distance to the base weights after merge + unmerge, and after all the
merge / unmerge cycles of the timed rounds (drift).
Threads: 1 (`--threads`), as the other benchmarks, for steadier figures on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fill_defaults, llama, run_meta, table, write_result

import lora_fx
from lora_fx.core import graph as _graph
from lora_fx.math import ops
from lora_fx.passes import _fold
from lora_fx.sites import all_sites

HIDDEN, INTERMEDIATE, HEADS, VOCAB, SEQ = 1024, 2816, 16, 1024, 8
RANK, ALPHA = 16, 32
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_merge.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Timed variants, in the order each round runs them.
_VARIANTS = (
    "floor",
    "stream",
    "fx_merge",
    "fx_unmerge",
    "peft_merge",
    "peft_unmerge",
    "fx_merge_and_unload",
    "peft_merge_and_unload",
)


def make_adapter(base: nn.Module, folder: str) -> list[str]:
    """Save a random all-linear PEFT adapter (values bf16-exact) to `folder`; returns its sites."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_" in name:
                p.copy_(p.bfloat16().float())  # the same numbers in float32 and bf16 adapters
    pm.save_pretrained(folder)
    prefix = "base_model.model."
    return [n.removeprefix(prefix) for n, m in pm.named_modules() if isinstance(m, LoraLayer)]


@contextmanager
def fold_clock() -> Iterator[list[float]]:
    """Time spent inside `_fold.fold` / `_fold.unfold` (merge's weight updates) while active."""
    spent = [0.0]
    originals = _fold.fold, _fold.unfold

    def clocked(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return run

    _fold.fold, _fold.unfold = clocked(originals[0]), clocked(originals[1])
    try:
        yield spent
    finally:
        _fold.fold, _fold.unfold = originals


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(total seconds, seconds in folds) of one call of `fn`, GC off."""
    gc.collect()
    gc.disable()
    try:
        with fold_clock() as folds:
            start = time.perf_counter()
            fn()
            total = time.perf_counter() - start
        return total, folds[0]
    finally:
        gc.enable()


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of bytes held by tensors allocated during `fn` (profiler, op granularity)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    steps = []
    for event in prof.events():
        if event.name == "[memory]":  # allocated or freed outside any op
            steps.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage:
            steps.append((event.time_range.start, event.self_cpu_memory_usage))
    live = peak = 0
    for _, change in sorted(steps, key=lambda s: s[0]):
        live += change
        peak = max(peak, live)
    return peak


class Bench:
    """One dtype: the floor's weights, a loaded lora_fx graph and a PEFT model on equal weights."""

    def __init__(self, base: nn.Module, dtype: torch.dtype, folder: str, sites: list[str]):
        from peft import PeftModel

        self.sites, self.dtype = sites, dtype
        model = copy.deepcopy(base).to(dtype)
        self.base_weights = {s: model.get_submodule(s).weight.detach().clone() for s in sites}
        ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
        # The graph shares Parameters with `fx_model`; every variant owns its weights.
        self.fx_model = copy.deepcopy(model)
        gm = lora_fx.capture(self.fx_model, (ids,), {"use_cache": False})
        self.gm = lora_fx.load_adapter(gm, folder)
        # Pristine copies (merge / unmerge cycles drift low-precision weights), copied again per
        # merge_and_unload and for the rounding figure.
        self.gm_fresh = copy.deepcopy(self.gm)
        self.pm = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
        self.pm_fresh = copy.deepcopy(self.pm)
        self.pm_bf16 = None
        if dtype == torch.bfloat16:
            self.pm_bf16 = PeftModel.from_pretrained(
                copy.deepcopy(model), folder, autocast_adapter_dtype=False
            ).eval()
        # The floor: factors in W's dtype, on a private copy of the site weights.
        self.floor = []
        for site in sites:
            layer = self.pm.base_model.model.get_submodule(site)
            a = layer.lora_A["default"].weight.detach().to(dtype)
            b = layer.lora_B["default"].weight.detach().to(dtype)
            self.floor.append((self.base_weights[site].clone(), b, a, layer.scaling["default"]))
        self.sign = 1.0

    def run_floor(self) -> None:
        with torch.no_grad():
            for w, b, a, scale in self.floor:
                w.addmm_(b, a, alpha=self.sign * scale)
        self.sign = -self.sign  # keep the private weights bounded over rounds

    def run_stream(self) -> None:
        with torch.no_grad():
            for w, *_ in self.floor:
                w.mul_(1.0)

    def variants(self) -> dict[str, Callable[[], Any]]:
        """The timed calls that need no fresh copy (merge_and_unload does: `bench_round`)."""
        return {
            "floor": self.run_floor,
            "stream": self.run_stream,
            "fx_merge": lambda: lora_fx.merge(self.gm),
            "fx_unmerge": lambda: lora_fx.unmerge(self.gm),
            "peft_merge": self.pm.merge_adapter,
            "peft_unmerge": self.pm.unmerge_adapter,
        }

    def fresh_fx(self) -> torch.fx.GraphModule:
        return copy.deepcopy(self.gm_fresh)

    def fresh_peft(self) -> nn.Module:
        return copy.deepcopy(self.pm_fresh)

    def fx_weights(self, gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
        """The site weights a lora_fx graph holds now."""
        sites = all_sites(gm)
        return {s: _graph.get_attr(gm, sites[s].weight) for s in self.sites}

    def peft_weights(self, pm: nn.Module) -> dict[str, torch.Tensor]:
        """The base weights under a PEFT model's LoRA layers."""
        return {s: pm.base_model.model.get_submodule(s).base_layer.weight for s in self.sites}


def bench_round(bench: Bench, samples: dict[str, list[tuple[float, float]]]) -> None:
    """One call of every variant, in `_VARIANTS` order (merge before its unmerge)."""
    calls = bench.variants()
    for name in _VARIANTS:
        if name == "fx_merge_and_unload":
            gm = bench.fresh_fx()
            samples[name].append(timed(lambda gm=gm: lora_fx.merge_and_unload(gm)))
            del gm
        elif name == "peft_merge_and_unload":
            pm = bench.fresh_peft()
            samples[name].append(timed(pm.merge_and_unload))
            del pm
        else:
            samples[name].append(timed(calls[name]))


def memory(bench: Bench) -> dict[str, int]:
    """Peak extra bytes of each variant (one profiled call each, untimed)."""
    out = {"floor": peak_bytes(bench.run_floor)}
    out["fx_merge"] = peak_bytes(lambda: lora_fx.merge(bench.gm))
    out["fx_unmerge"] = peak_bytes(lambda: lora_fx.unmerge(bench.gm))
    out["peft_merge"] = peak_bytes(bench.pm.merge_adapter)
    out["peft_unmerge"] = peak_bytes(bench.pm.unmerge_adapter)
    gm = bench.fresh_fx()
    out["fx_merge_and_unload"] = peak_bytes(lambda gm=gm: lora_fx.merge_and_unload(gm))
    pm = bench.fresh_peft()
    out["peft_merge_and_unload"] = peak_bytes(pm.merge_and_unload)
    del gm, pm
    return out


def rounding(bench: Bench, cycles: int) -> dict[str, Any]:
    """Rounding of a merge, of merge + unmerge, and drift after `cycles` cycles, per ||delta||."""
    layers = {s: bench.pm_fresh.base_model.model.get_submodule(s) for s in bench.sites}
    exact, deltas, delta_sq, base_sq = {}, {}, 0.0, 0.0
    for site, layer in layers.items():
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        deltas[site] = layer.scaling["default"] * b @ a
        exact[site] = bench.base_weights[site].double() + deltas[site]
        delta_sq += float(deltas[site].square().sum())
        base_sq += float(bench.base_weights[site].double().square().sum())

    def loss(weights: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
        err = sum(float((weights[s].double() - want[s]).square().sum()) for s in bench.sites)
        return (err / delta_sq) ** 0.5

    out: dict[str, Any] = {"delta_over_weight": (delta_sq / base_sq) ** 0.5, "cycles": cycles}
    gm = lora_fx.merge(bench.fresh_fx())
    out["fx"] = loss(bench.fx_weights(gm), exact)
    out["fx_report_max"] = max(lora_fx.merge_report(gm).values())
    lora_fx.unmerge(gm)
    out["fx_unmerge"] = loss(bench.fx_weights(gm), bench.base_weights)
    pm = bench.fresh_peft()
    pm.merge_adapter()
    out["peft_fp32_adapters"] = loss(bench.peft_weights(pm), exact)
    pm.unmerge_adapter()
    out["peft_unmerge"] = loss(bench.peft_weights(pm), bench.base_weights)
    if bench.pm_bf16 is not None:
        merged = bench.pm_bf16.merge_and_unload()
        weights = {s: merged.get_submodule(s).weight for s in bench.sites}
        out["peft_bf16_adapters"] = loss(weights, exact)
    out["fx_drift"] = loss(bench.fx_weights(bench.gm), bench.base_weights)
    out["peft_drift"] = loss(bench.peft_weights(bench.pm), bench.base_weights)
    return out


def bench_dtype(base: nn.Module, dtype_name: str, folder: str, sites: list[str], rounds: int,
                runs: int) -> dict[str, Any]:  # fmt: skip
    bench = Bench(base, _DTYPES[dtype_name], folder, sites)
    site_bytes = [w.numel() * w.element_size() for w in bench.base_weights.values()]
    row: dict[str, Any] = {
        "dtype": dtype_name,
        "sites": len(sites),
        "site_weight_bytes_total": sum(site_bytes),
        "site_weight_bytes_max": max(site_bytes),
    }
    bench_round(bench, {name: [] for name in _VARIANTS})  # warm-up: allocator, first calls
    row["runs"] = []
    for _ in range(runs):
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in _VARIANTS}
        for _ in range(rounds):
            bench_round(bench, samples)
        total = {n: statistics.median(t for t, _ in samples[n]) for n in _VARIANTS}
        folds = {n: statistics.median(f for _, f in samples[n]) for n in _VARIANTS}
        row["runs"].append(
            {
                "rounds": rounds,
                "median_ms": {n: 1e3 * total[n] for n in _VARIANTS},
                "fold_median_ms": {n: 1e3 * folds[n] for n in _VARIANTS if n.startswith("fx_")},
                "over_floor": {n: total[n] / total["floor"] for n in _VARIANTS},
                "fold_over_floor": {
                    n: folds[n] / total["floor"] for n in _VARIANTS if n.startswith("fx_")
                },
            }
        )
    row["rounding"] = rounding(bench, cycles=1 + rounds * runs)  # warm-up + timed rounds
    row["peak_extra_bytes"] = memory(bench)
    return row


_TIME_ROWS = (  # (label, variant, has a fold time)
    ("floor: W.addmm_(B, A)", "floor", False),
    ("stream: W.mul_(1)", "stream", False),
    ("fx merge", "fx_merge", True),
    ("fx unmerge", "fx_unmerge", True),
    ("fx merge_and_unload", "fx_merge_and_unload", True),
    ("peft merge_adapter", "peft_merge", False),
    ("peft unmerge_adapter", "peft_unmerge", False),
    ("peft merge_and_unload", "peft_merge_and_unload", False),
)


def report(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    mib = 1 << 20
    out = [
        f"bench_merge: lora_fx {meta['lora_fx']} vs peft {meta['peft']} | torch {meta['torch']} | "
        f"{meta['threads']} thread(s) | chunk {ops.MERGE_CHUNK_BYTES // mib} MiB",
        f"LlamaForCausalLM hidden {HIDDEN}, intermediate {INTERMEDIATE}, "
        f"{result['config']['layers']} layers | all-linear r={RANK} alpha={ALPHA}",
    ]
    for row in rows:
        out += [
            "",
            f"{row['dtype']}: {row['sites']} sites, "
            f"{row['site_weight_bytes_total'] / mib:.0f} MiB of site weights "
            f"(largest {row['site_weight_bytes_max'] / mib:.1f} MiB)",
        ]
        header = ["variant"]
        for i, _ in enumerate(row["runs"]):
            header += [f"run{i + 1} ms", "xfloor", "folds ms", "xfloor"]
        header += ["peak extra MiB"]
        lines = []
        for label, name, has_fold in _TIME_ROWS:
            cells = [label]
            for run in row["runs"]:
                cells += [f"{run['median_ms'][name]:.1f}", f"{run['over_floor'][name]:.2f}"]
                if has_fold:
                    cells += [
                        f"{run['fold_median_ms'][name]:.1f}",
                        f"{run['fold_over_floor'][name]:.2f}",
                    ]
                else:
                    cells += ["", ""]
            peak = row["peak_extra_bytes"].get(name)
            cells.append("" if peak is None else f"{peak / mib:.2f}")
            lines.append(cells)
        out.append(table(header, lines))
        r = row["rounding"]
        parts = [f"lora_fx {r['fx']:.2e} (report max {r['fx_report_max']:.2e})"]
        parts.append(f"peft fp32 adapters {r['peft_fp32_adapters']:.2e}")
        if "peft_bf16_adapters" in r:
            parts.append(f"peft bf16 adapters {r['peft_bf16_adapters']:.2e}")
        out.append(
            f"rounding, ||written - exact|| / ||delta|| (||delta||/||W|| = "
            f"{r['delta_over_weight']:.2f}); merge: " + ", ".join(parts)
        )
        out.append(
            f"  merge + unmerge once: lora_fx {r['fx_unmerge']:.2e}, peft {r['peft_unmerge']:.2e}; "
            f"after {r['cycles']} cycles: lora_fx {r['fx_drift']:.2e}, peft {r['peft_drift']:.2e}"
        )
    out += ["", f"total {meta['total_s']:.0f} s"]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 layer, 2 rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per run")
    parser.add_argument("--runs", type=int, help="times the whole measurement is repeated")
    parser.add_argument("--dtypes", nargs="+", choices=list(_DTYPES), default=list(_DTYPES))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)"
    )
    args = parser.parse_args(argv)
    quick = {"layers": 1, "rounds": 2, "runs": 1}
    full = {"layers": 4, "rounds": 7, "runs": 2}
    return fill_defaults(args, quick=quick, full=full)


def main(argv: list[str] | None = None) -> dict[str, Any]:

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Deprecation noise from transformers (PEFT calls it) and torch pytree (deepcopy of a graph);
    # lora_fx's bf16 rounding warning is the figure reported here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    warnings.filterwarnings("ignore", message="merge lost up to", category=UserWarning)
    start = time.perf_counter()
    base = llama(
        args.layers,
        hidden=HIDDEN,
        intermediate=INTERMEDIATE,
        heads=HEADS,
        kv_heads=HEADS,
        vocab=VOCAB,
        seq=SEQ,
    )
    with tempfile.TemporaryDirectory() as folder:
        sites = make_adapter(base, folder)
        rows = [bench_dtype(base, d, folder, sites, args.rounds, args.runs) for d in args.dtypes]
    result = {
        "meta": run_meta(quick=args.quick, start=start),
        "config": {
            "model": "LlamaForCausalLM",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_attention_heads": HEADS,
            "vocab_size": VOCAB,
            "layers": args.layers,
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": "all-linear",
            "rounds": args.rounds,
            "runs": args.runs,
            "merge_chunk_bytes": ops.MERGE_CHUNK_BYTES,
        },
        "rows": rows,
    }
    write_result(result, args.out, report)
    return result


if __name__ == "__main__":
    main()
