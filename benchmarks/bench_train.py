"""LoRA training steps, lora_fx next to HF PEFT, eager and torch.compile'd, in one run.

    python benchmarks/bench_train.py                # full run (several minutes on 2 CPU cores)
    python benchmarks/bench_train.py --quick        # smoke mode: 2 layers, few rounds
    python benchmarks/bench_train.py --out x.json   # JSON path (default results/bench_train.json)
    python benchmarks/bench_train.py --profile      # also: op tables, GEMM time base vs rank-r

One training step: forward, cross-entropy on next-token targets, backward, AdamW step on the LoRA
parameters, `zero_grad(set_to_none=True)`. Variants (same base weights, same adapter, same batch):
    fx eager          lora_fx.capture + load_adapter, the GraphModule called as it is
    fx compiled       torch.compile(gm, fullgraph=True) (inductor)
    peft eager        PeftModel.from_pretrained(model, adapter, is_trainable=True)
    peft compiled     torch.compile(peft_model) (inductor; graph breaks allowed and counted)
    fx eager ckpt     lora_fx.checkpoint_blocks(gm)
    fx compiled ckpt  torch.compile of the checkpointed graph
    peft eager gc     PEFT with transformers' gradient checkpointing (non-reentrant)
    peft compiled gc  torch.compile of that

Figures:
1. Throughput: tokens/s from the median step time over interleaved rounds (one step of every
   variant per round, in a shuffled order, garbage collector off); speed ratios are medians of
   per-round ratios with their 25th-75th percentile range.
2. Compile time: the first step's time minus the median step time (dynamo + AOTAutograd +
   inductor for forward and backward; the caches are cleared first).
3. Held after forward: bytes torch's CPU allocator holds at the end of a training forward above
   its level at the start (profiler allocation events, as for 4): the activations kept for
   backward plus the 2 MiB of logits. Read from the allocator, not from saved-tensor hooks,
   which a branch's own hooks (lora_fx's eager fused layout) would hide from an outer one.
4. Peak memory: the most bytes torch's CPU allocator held during one step above what it held when
   the step began (activations, gradients, temporaries; the optimizer state already exists), read
   from the profiler's allocation events (`profile_memory=True`). The allocator reports every
   tensor allocation, eager or inductor-generated; Python objects and allocator caching are not
   counted (RSS would mix those in and is too noisy at this size). Persistent state is counted
   apart: LoRA gradient bytes at the end of backward and AdamW state bytes, and how many frozen
   parameters hold a gradient or optimizer state (must be 0).
5. Profile (`--profile`): torch.profiler's operator table of one step of each of the four main
   variants after the timed rounds, sorted by self CPU time; the top rows go into the JSON. Each
   profiled step is also split into GEMM time by kind: "rank" GEMMs have the LoRA rank as one of
   their dimensions (the branch's own products, forward and backward, with any copy inside an
   `addmm`), "base" GEMMs are the rest. From it: the ceiling of `fx compiled / peft eager` if
   the rank-r GEMMs cost nothing, median(peft eager) / (median(fx compiled) - rank GEMM ms).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import fill_defaults, llama, ratios, run_meta, table, timed, write_result

import lora_fx

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 256, 688, 4, 2, 1024
RANK, ALPHA, LR = 8, 16, 1e-4
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_train.json"
VARIANTS = (
    "fx eager",
    "fx compiled",
    "peft eager",
    "peft compiled",
    "fx eager ckpt",
    "fx compiled ckpt",
    "peft eager gc",
    "peft compiled gc",
)
# --profile: the variants profiled, and the operator-table rows printed for each.
PROFILED = ("fx eager", "fx compiled", "peft eager", "peft compiled")
PROFILE_ROWS = 15
# (label, numerator, denominator): throughput ratios reported.
_RATIOS = (
    ("fx compiled / peft compiled", "fx compiled", "peft compiled"),
    ("fx compiled / peft eager", "fx compiled", "peft eager"),
    ("fx eager / peft eager", "fx eager", "peft eager"),
    ("peft compiled / peft eager", "peft compiled", "peft eager"),
)


class Variant:
    """One way to run a training step, with its own copy of the weights and its own optimizer."""

    def __init__(self, name: str, module: nn.Module, forward: Callable[[torch.Tensor], Any]):
        self.name, self.module, self.forward = name, module, forward
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LR)
        self.grad_bytes = 0

    def step(self, ids: torch.Tensor) -> float:
        logits = self.forward(ids)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        self.grad_bytes = sum(p.grad.nbytes for p in self.trainable if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def state(self) -> dict[str, int]:
        """Persistent training state: optimizer bytes, and frozen parameters holding any state."""
        trainable = {id(p) for p in self.trainable}
        frozen = [p for p in self.module.parameters() if id(p) not in trainable]
        return {
            "trainable_params": sum(p.numel() for p in self.trainable),
            "frozen_params": sum(p.numel() for p in frozen),
            "lora_grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": sum(
                t.nbytes
                for s in self.optimizer.state.values()
                for t in s.values()
                if torch.is_tensor(t)
            ),
            "frozen_with_grad": sum(p.grad is not None for p in frozen),
            "frozen_with_optimizer_state": sum(p in self.optimizer.state for p in frozen),
        }


def build(name: str, base: nn.Module, adapter_dir: str, ids: torch.Tensor) -> Variant:
    """A variant on a deep copy of `base` with the adapter saved in `adapter_dir`."""
    from peft import PeftModel

    compiled = "compiled" in name
    if name.startswith("fx"):
        gm = lora_fx.capture(copy.deepcopy(base), (ids,), {"use_cache": False})
        gm = lora_fx.load_adapter(gm, adapter_dir)
        if "ckpt" in name:
            lora_fx.checkpoint_blocks(gm)
        gm.train()
        fn = torch.compile(gm, fullgraph=True) if compiled else gm
        return Variant(name, gm, lambda x: fn(x).logits)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir, is_trainable=True)
    if name.endswith(" gc"):
        pm.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    pm.train()
    fn = torch.compile(pm) if compiled else pm
    return Variant(name, pm, lambda x: fn(input_ids=x, use_cache=False).logits)


def warm_up_inductor() -> None:
    """Compile a tiny forward/backward once: no variant's compile time pays inductor's start-up."""
    lin = nn.Linear(8, 8)
    torch.compile(lambda x: torch.relu(lin(x)).sum())(torch.randn(4, 8)).backward()
    torch._dynamo.reset()


def _allocation_events(fn: Callable[[], Any]) -> tuple[list[tuple[float, int]], Any]:
    """(time, bytes) of every CPU allocation (+) and free (-) while `fn` runs, and its result."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    allocations = sorted(
        (e["ts"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0  # CPU
    )
    return allocations, result


def peak_step_bytes(variant: Variant, ids: torch.Tensor) -> int:
    """Most bytes held by torch's CPU allocator during one step, above the level at its start."""
    allocations, _ = _allocation_events(lambda: variant.step(ids))
    level = peak = 0
    for _, nbytes in allocations:
        level += nbytes
        peak = max(peak, level)
    return peak


def forward_held_bytes(variant: Variant, ids: torch.Tensor) -> int:
    """Bytes torch's CPU allocator holds after a training forward above its level before it:
    the activations kept for backward, plus the logits."""
    allocations, logits = _allocation_events(lambda: variant.forward(ids))
    del logits  # frees the autograd graph; no backward, no gradients
    return sum(nbytes for _, nbytes in allocations)


def profile_step(variant: Variant, ids: torch.Tensor, rows: int) -> tuple[str, dict[str, Any]]:
    """torch.profiler's operator table of one step (by self CPU time), its top rows, and its
    GEMM time split into base and rank-r GEMMs."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        variant.step(ids)
    averages = prof.key_averages()
    text = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    total = sum(e.self_cpu_time_total for e in averages)
    gemm_ms = {"base": 0.0, "rank": 0.0}
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm"):  # neither calls the other
            shapes = [s for s in event.input_shapes if s][:3]
            kind = "rank" if any(RANK in shape for shape in shapes) else "base"
            gemm_ms[kind] += event.cpu_time_total / 1e3  # an addmm's total includes its copy
    return text, {
        "profiled_step_ms": total / 1e3,
        "base_gemm_ms": gemm_ms["base"],
        "rank_gemm_ms": gemm_ms["rank"],
        "top": [
            {
                "name": e.key,
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "self_cpu_pct": 100 * e.self_cpu_time_total / total,
                "cpu_total_ms": e.cpu_time_total / 1e3,
            }
            for e in top
        ],
    }


def check_outputs(variants: dict[str, Variant], ids: torch.Tensor) -> dict[str, float]:
    """Max |logit| gaps between variants before training (eval mode: no dropout)."""
    with torch.no_grad():
        out = {}
        for name, v in variants.items():
            v.module.eval()
            out[name] = v.forward(ids).float()
            v.module.train()
    ref = out["peft eager"]
    return {f"{name} vs peft eager": (o - ref).abs().max().item() for name, o in out.items()}


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    base = llama(
        args.layers,
        hidden=HIDDEN,
        intermediate=INTERMEDIATE,
        heads=HEADS,
        kv_heads=KV_HEADS,
        vocab=VOCAB,
        seq=args.seq,
    ).train()  # as built from config: every module in train mode when captured
    ids = torch.randint(
        0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    names = [n for n in VARIANTS if n in args.variants]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    warm_up_inductor()
    with tempfile.TemporaryDirectory() as adapter_dir:
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=args.dropout,
                         target_modules="all-linear", init_lora_weights=False)  # fmt: skip
        torch.manual_seed(2)
        get_peft_model(copy.deepcopy(base), cfg).save_pretrained(adapter_dir)
        variants = {n: build(n, base, adapter_dir, ids) for n in names}
    checks = check_outputs(variants, ids)

    # First step of each variant (compiles the compiled ones), then warm-up steps.
    first_s, breaks = {}, {}
    for name, v in variants.items():
        before = graph_breaks()
        first_s[name], _ = timed(lambda v=v: v.step(ids))
        breaks[name] = graph_breaks() - before
    for _ in range(args.warmup):
        for v in variants.values():
            v.step(ids)

    rng = random.Random(0)
    order = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in order}
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            seconds, _ = timed(lambda name=name: variants[name].step(ids))
            samples[name].append(seconds)

    memory = {name: peak_step_bytes(v, ids) for name, v in variants.items()}
    held = {name: forward_held_bytes(v, ids) for name, v in variants.items()}
    profiles = {}
    for name in PROFILED if args.profile else ():
        if name in variants:
            text, summary = profile_step(variants[name], ids, PROFILE_ROWS)
            print(f"profile of one '{name}' step (self CPU time)\n{text}")
            profiles[name] = summary
    tokens = args.batch * args.seq
    rows = {}
    for name in names:
        median = statistics.median(samples[name])
        rows[name] = {
            "median_step_ms": 1e3 * median,
            "tokens_per_s": tokens / median,
            "first_step_s": first_s[name],
            "compile_s": first_s[name] - median if "compiled" in name else None,
            "graph_breaks": breaks[name] if "compiled" in name else None,
            "peak_step_mb": memory[name] / 2**20,
            "forward_held_mb": held[name] / 2**20,
            **variants[name].state(),
        }
    # A speed-up num / den is the per-round step time of den over that of num.
    speedups = ratios(samples, [(label, den, num) for label, num, den in _RATIOS])
    result = {"rows": rows, "speedups": speedups, "checks": checks}
    if args.profile:
        result["profile"] = profiles
        if {"fx compiled", "peft eager"} <= profiles.keys():
            rank_ms = profiles["fx compiled"]["rank_gemm_ms"]
            result["rank_free_ceiling"] = rows["peft eager"]["median_step_ms"] / (
                rows["fx compiled"]["median_step_ms"] - rank_ms
            )
    return result


def report(result: dict[str, Any]) -> str:
    meta, cfg, res = result["meta"], result["config"], result["result"]
    rows = res["rows"]

    def opt(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    out = [
        f"bench_train: lora_fx {meta['lora_fx']} vs peft {meta['peft']} | torch {meta['torch']} | "
        f"transformers {meta['transformers']} | {meta['threads']} thread(s)",
        f"LlamaForCausalLM {cfg['layers']} layers, hidden {HIDDEN}, intermediate {INTERMEDIATE}, "
        f"heads {HEADS}/{KV_HEADS}, vocab {VOCAB} | all-linear r={RANK} alpha={ALPHA} "
        f"dropout={cfg['lora_dropout']} | batch {cfg['batch']}x{cfg['seq']} | AdamW | "
        f"{cfg['rounds']} rounds" + (" | fallback_random" if cfg["fallback_random"] else ""),
        "",
        table(
            [
                "variant",
                "step ms",
                "tokens/s",
                "compile s",
                "breaks",
                "fwd held MB",
                "peak MB",
                "opt state KB",
            ],
            [
                [
                    name,
                    f"{r['median_step_ms']:.1f}",
                    f"{r['tokens_per_s']:.0f}",
                    opt(r["compile_s"], ".1f"),
                    opt(r["graph_breaks"], "d"),
                    f"{r['forward_held_mb']:.1f}",
                    f"{r['peak_step_mb']:.1f}",
                    f"{r['optimizer_state_bytes'] / 1024:.0f}",
                ]
                for name, r in rows.items()
            ],
        ),
        "",
        "speed-ups (median of per-round ratios of step times [p25-p75])",
        table(
            ["ratio", "median", "p25-p75"],
            [
                [label, f"{r['median']:.2f}x", f"{r['p25']:.2f}-{r['p75']:.2f}"]
                for label, r in res["speedups"].items()
            ],
        ),
        "",
        *_profile_lines(res),
        "frozen parameters holding a gradient / AdamW state: "
        + ", ".join(
            f"{name} {r['frozen_with_grad']}/{r['frozen_with_optimizer_state']}"
            for name, r in rows.items()
        ),
        "max |logit| gap before training (eval): "
        + ", ".join(f"{k} {v:.1e}" for k, v in res["checks"].items()),
        "",
        f"total {meta['total_s']:.0f} s",
    ]
    return "\n".join(out)


def _profile_lines(res: dict[str, Any]) -> list[str]:
    """The --profile GEMM split per variant, and the rank-free ceiling; nothing without it."""
    if "profile" not in res:
        return []
    lines = [
        "one profiled step: GEMM ms by kind (rank = the LoRA rank is one of the dimensions)",
        table(
            ["variant", "profiled step ms", "base GEMM ms", "rank GEMM ms"],
            [
                [
                    name,
                    f"{p['profiled_step_ms']:.1f}",
                    f"{p['base_gemm_ms']:.1f}",
                    f"{p['rank_gemm_ms']:.1f}",
                ]
                for name, p in res["profile"].items()
            ],
        ),
    ]
    if "rank_free_ceiling" in res:
        lines.append(
            "fx compiled / peft eager if the rank-r GEMMs cost nothing: "
            f"{res['rank_free_ceiling']:.2f}x"
        )
    return [*lines, ""]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 layers, few rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--batch", type=int, help="sequences per step")
    parser.add_argument("--seq", type=int, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, help="timed rounds (one step per variant each)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant after the first")
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="lora_dropout (PEFT's default 0)"
    )
    parser.add_argument(
        "--fallback-random",
        action="store_true",
        help="torch._inductor.config.fallback_random: compiled dropout draws with eager's RNG",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one step of each main variant: op table, base vs rank-r GEMM time",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)"
    )
    args = parser.parse_args(argv)
    quick = {"layers": 2, "batch": 4, "seq": 64, "rounds": 5, "warmup": 1}
    full = {"layers": 4, "batch": 4, "seq": 128, "rounds": 20, "warmup": 2}
    return fill_defaults(args, quick=quick, full=full)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Compile times are for a cold compile: no inductor / AOTAutograd cache hits from earlier runs.
    torch._inductor.config.force_disable_caches = True
    torch._inductor.config.fallback_random = args.fallback_random
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
    start = time.perf_counter()
    res = run(args)
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
            "batch": args.batch,
            "seq": args.seq,
            "r": RANK,
            "lora_alpha": ALPHA,
            "lora_dropout": args.dropout,
            "target_modules": "all-linear",
            "optimizer": f"AdamW(lr={LR})",
            "rounds": args.rounds,
            "warmup": args.warmup,
            "fallback_random": args.fallback_random,
            "profile": args.profile,
        },
        "result": res,
    }
    write_result(result, args.out, report)
    return result


if __name__ == "__main__":
    main()
