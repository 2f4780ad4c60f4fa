"""4. Many adapters in one batch (issue 19): 4 / 16 / 64 adapters, batch 32, eager and compiled.

For each count, adapters of rank 8 and 16 alternate (lora_alpha 16); each row of a batch of 32 draws
an adapter at random (a new draw every round, so most batches are compositions never seen before).
Variants, interleaved per round: lora_fx mixed (`set_adapter_batch` + forward: rows gather their
adapter from per-site stacks), PEFT mixed (`adapter_names=`), and the captured base graph. A
rank-8-only set of 4 adapters measures the `<= 1.3x base at rank 8` goal. Compiled: the first
call, then new compositions and an adapter loaded into a free slot with recompiles forbidden
(lora_fx), and PEFT on one composition (it recompiles per composition); steady state per side.
Memory: the stacks (every slot, padded to the site's largest rank), the adapters' own tensors,
and one batch's gathered factors (`batch * r_max * (in + out)` per site, freed after the site).
"""

from __future__ import annotations

import argparse
import copy
import random
from pathlib import Path
from typing import Any

import torch
from _common import interleaved, median_ms, ratios, spread, table, timed
from torch import nn

import lora_fx

from .shared import gap, new_graphs, peft_config, recompiles_forbidden

__all__ = ["bench_counts", "report_counts"]

_RATIOS = (
    ("fx_mixed/peft_mixed", "fx_mixed", "peft_mixed"),
    ("fx_mixed/fx_base", "fx_mixed", "fx_base"),
    ("peft_mixed/fx_base", "peft_mixed", "fx_base"),
)


def _names(count: int, rank8_only: bool) -> dict[str, tuple[int, int]]:
    """`count` adapters `a00`, `a01`, ...: ranks 8 and 16 alternating (or all 8), alpha 16."""
    return {f"a{k:02d}": (8 if rank8_only or k % 2 == 0 else 16, 16) for k in range(count)}


def _draw(names: list[str], batch: int, rng: random.Random) -> list[str]:
    return [rng.choice(names) for _ in range(batch)]


def _build(base: nn.Module, adapters: dict, folder: Path) -> nn.Module:
    """PEFT with every adapter, saved to `folder` (one subfolder each)."""
    from peft import get_peft_model

    pm = None
    for k, (name, (r, alpha)) in enumerate(adapters.items()):
        torch.manual_seed(100 + k)
        if pm is None:
            pm = get_peft_model(copy.deepcopy(base), peft_config(r, alpha), name)
        else:
            pm.add_adapter(name, peft_config(r, alpha))
    pm.eval().save_pretrained(folder)
    return pm


def _memory(gm: torch.fx.GraphModule, batch: int) -> dict[str, int]:
    """Bytes: the stacks, the adapters' own A/B, and the largest site's gathered rows."""
    stacks = getattr(gm, "lora_fx_stacks", None)
    holders = [] if stacks is None else [m for m in stacks.modules() if "a_t" in m._buffers]
    size = 4 if not holders else holders[0].a_t.element_size()
    own = sum(p.numel() * p.element_size() for n, p in gm.named_parameters() if ".lora_" in n)
    return {
        "stacks": sum(t.numel() * size for m in holders for t in (m.a_t, m.b_t)),
        "adapters_own": own,
        "gathered_rows_per_site_max": max(
            (batch * (m.a_t[0].numel() + m.b_t[0].numel()) * size for m in holders), default=0
        ),
    }


def _one_count(
    base: nn.Module,
    fx_model: nn.Module,
    fx_base: torch.fx.GraphModule,
    ids: torch.Tensor,
    folder: Path,
    count: int,
    args: argparse.Namespace,
    *,
    rank8_only: bool = False,
) -> dict[str, Any]:
    adapters = _names(count, rank8_only)
    names = list(adapters)
    loaded = names[:-1]  # the last one is loaded into a free slot later (compiled figure)
    pm = _build(base, adapters, folder)
    kw = {"use_cache": False}
    gm = lora_fx.capture(fx_model, (ids,), kw)
    load_s = [timed(lambda n=n: lora_fx.load_adapter(gm, folder / n, n))[0] for n in loaded]
    gm.eval()
    rng = random.Random(count)
    batch = ids.shape[0]
    comps = [_draw(loaded, batch, rng) for _ in range(64)]
    switch_first_s, _ = timed(lambda: lora_fx.set_adapter_batch(gm, comps[0], capacity=count))
    with torch.no_grad():
        reference = pm(input_ids=ids, adapter_names=comps[1], use_cache=False).logits
        lora_fx.set_adapter_batch(gm, comps[1])
        check = gap(gm(ids), reference)
        turn = iter(range(10**9))

        def fx_mixed():
            lora_fx.set_adapter_batch(gm, comps[next(turn) % len(comps)])
            return gm(ids)

        variants = {
            "fx_mixed": fx_mixed,
            "peft_mixed": lambda: pm(
                input_ids=ids, adapter_names=comps[rng.randrange(len(comps))], use_cache=False
            ),
            "fx_base": lambda: fx_base(ids),
        }
        samples = interleaved(variants, seconds=args.forward_seconds, min_rounds=args.min_rounds)
    switch = [timed(lambda c=c: lora_fx.set_adapter_batch(gm, c))[0] for c in comps[:16]]
    peft_load_s = timed(lambda: pm.load_adapter(str(folder / names[-1]), names[-1]))[0]
    out: dict[str, Any] = {
        "adapters": count,
        "ranks": sorted({r for r, _ in adapters.values()}),
        "max_abs_diff_vs_peft": check,
        "rounds": len(samples["fx_mixed"]),
        "median_ms": {k: median_ms(v) for k, v in samples.items()},
        "ratios": ratios(samples, _RATIOS),
        "load_adapter_ms": 1e3 * sorted(load_s)[len(load_s) // 2],
        "peft_load_adapter_ms": 1e3 * peft_load_s,
        "first_set_adapter_batch_ms": 1e3 * switch_first_s,
        "switch_ms": 1e3 * sorted(switch)[len(switch) // 2],
        "memory_bytes": _memory(gm, batch),
    }
    if args.compile and not rank8_only:
        out["compiled"] = _compiled(gm, pm, fx_base, ids, comps, folder, names[-1], args)
    lora_fx.set_adapter_batch(gm, None)
    return out


def _compiled(gm, pm, fx_base, ids, comps, folder, last, args) -> dict[str, Any]:
    """First call, new compositions and a slot load with recompiles forbidden; steady state."""
    torch._dynamo.reset()
    res: dict[str, Any] = {"backend": args.backend}
    with torch.no_grad():
        fx = torch.compile(gm, backend=args.backend)
        res["fx_first_call_s"], res["fx_first_graphs"], _ = new_graphs(lambda: fx(ids))
        graphs = 0
        with recompiles_forbidden():
            for comp in comps[2:6]:
                lora_fx.set_adapter_batch(gm, comp)
                graphs += new_graphs(lambda: fx(ids))[1]
            load_s, _ = timed(lambda: lora_fx.load_adapter(gm, folder / last, last))
            comp = [last if i % 4 == 0 else n for i, n in enumerate(comps[6])]
            lora_fx.set_adapter_batch(gm, comp)
            graphs += new_graphs(lambda: fx(ids))[1]
            reference = pm(input_ids=ids, adapter_names=comp, use_cache=False).logits
            res["fx_gap_after_slot_load"] = gap(fx(ids), reference)
        res["fx_new_graphs_after_first"] = graphs
        res["fx_load_into_slot_ms"] = 1e3 * load_s
        peft = torch.compile(pm, backend=args.backend)
        res["peft_first_call_s"], res["peft_first_graphs"], _ = new_graphs(
            lambda: peft(input_ids=ids, adapter_names=comps[0], use_cache=False)
        )
        base = torch.compile(fx_base, backend=args.backend)
        base(ids)
        samples = {"fx_mixed": [], "peft_mixed": [], "fx_base": []}
        for i in range(args.steady_rounds):
            comp_i = comps[8 + i % 32]
            lora_fx.set_adapter_batch(gm, comp_i)
            samples["fx_mixed"].append(timed(lambda: fx(ids))[0])
            samples["peft_mixed"].append(
                timed(lambda: peft(input_ids=ids, adapter_names=comps[0], use_cache=False))[0]
            )
            samples["fx_base"].append(timed(lambda: base(ids))[0])
        res["steady_ms"] = {k: median_ms(v) for k, v in samples.items()}
    torch._dynamo.reset()
    return res


def bench_counts(
    base: nn.Module,
    fx_model: nn.Module,
    ids: torch.Tensor,
    folder: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Figure 4 for every count in `args.counts`, plus 4 rank-8 adapters."""
    fx_base = lora_fx.capture(fx_model, (ids,), {"use_cache": False}).eval()
    rows = [
        _one_count(base, fx_model, fx_base, ids, folder / f"n{count}", count, args)
        for count in args.counts
    ]
    rank8 = _one_count(base, fx_model, fx_base, ids, folder / "r8", 4, args, rank8_only=True)
    return {"counts": rows, "rank8_4_adapters": rank8}


def report_counts(res: dict[str, Any]) -> list[str]:
    rows = []
    for r in res["counts"]:
        ms, q = r["median_ms"], r["ratios"]
        mem = r["memory_bytes"]
        rows.append(
            [
                str(r["adapters"]),
                f"{ms['fx_mixed']:.1f}",
                f"{ms['peft_mixed']:.1f}",
                f"{ms['fx_base']:.1f}",
                spread(q["fx_mixed/peft_mixed"], 2),
                spread(q["fx_mixed/fx_base"], 2),
                f"{r['switch_ms']:.2f}",
                f"{r['load_adapter_ms']:.0f} / {r['peft_load_adapter_ms']:.0f}",
                f"{mem['stacks'] / 2**20:.1f} + {mem['gathered_rows_per_site_max'] / 2**20:.2f}",
                f"{r['max_abs_diff_vs_peft']:.1e}",
            ]
        )
    header = ["adapters", "fx ms", "peft ms", "base ms", "fx/peft", "fx/base", "switch ms"]
    header += ["load ms fx/peft", "MiB stacks+rows", "|fx-peft|"]
    out = [
        "4. Many adapters in one batch (batch 32 x seq 32, ranks 8/16 mixed, eager, no_grad):",
        table(header, rows),
    ]
    r8 = res["rank8_4_adapters"]["ratios"]["fx_mixed/fx_base"]
    out.append(f"   rank 8 only, 4 adapters: fx_mixed/fx_base {spread(r8, 2)}")
    first = res["counts"][0]["median_ms"]["fx_mixed"]
    for r in res["counts"][1:]:
        out.append(
            f"   fx_mixed at {r['adapters']} / at {res['counts'][0]['adapters']} adapters: "
            f"{r['median_ms']['fx_mixed'] / first:.3f}"
        )
    comp = [r for r in res["counts"] if "compiled" in r]
    if comp:
        rows = []
        for r in comp:
            c = r["compiled"]
            s = c["steady_ms"]
            rows.append(
                [
                    str(r["adapters"]),
                    f"{s['fx_mixed']:.1f}",
                    f"{s['peft_mixed']:.1f}",
                    f"{s['fx_base']:.1f}",
                    f"{s['fx_mixed'] / s['peft_mixed']:.2f}",
                    f"{s['fx_mixed'] / s['fx_base']:.2f}",
                    f"{c['fx_first_call_s']:.1f} / {c['peft_first_call_s']:.1f}",
                    str(c["fx_new_graphs_after_first"]),
                    f"{c['fx_load_into_slot_ms']:.0f}",
                    f"{c['fx_gap_after_slot_load']:.1e}",
                ]
            )
        header = ["adapters", "fx ms", "peft ms", "base ms", "fx/peft", "fx/base"]
        header += ["first call s fx/peft", "new graphs", "slot load ms", "|fx-peft|"]
        out += [
            f"   compiled ({comp[0]['compiled']['backend']}), steady state; lora_fx: new "
            "compositions + a load into a free slot, recompiles forbidden; PEFT: 1 composition",
            table(header, rows),
        ]
    return out
