"""Shared test helpers: graphs built from `models`, lora_fx nodes by role, 'no LoRA left', logs."""

from __future__ import annotations

import copy
import logging
import os
import random
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable

import peft
import pytest
import torch
from models import SITE_CASES, TinyBlockStack, tiny_llama

import lora_fx
from lora_fx import LoraConfig


def peft_and_lora_fx(model, gm, cfg: dict):
    """PEFT and lora_fx on the same weights, each seeded the same way just before injecting."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)).eval()
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**cfg))
    return pm, gm


def assert_init_matches_peft(gm: torch.fx.GraphModule, pm, init: str) -> None:
    """A, B and every base weight equal PEFT's to float32 rounding (the residual included).

    For the data-driven inits that rewrite base weights (CorDA, LoRA-GA).
    """
    from conftest import assert_close

    theirs, ours = pm.state_dict(), gm.state_dict()
    lora = [k for k in ours if ".lora_" in k]
    assert len(lora) == len([k for k in theirs if ".lora_" in k]) > 0
    for name in lora:
        assert ours[name].dtype == torch.float32
        assert_close(ours[name], theirs["base_model.model." + name])
    for name in [k for k in ours if k.endswith(".weight") and ".lora_" not in k]:
        key = f"base_model.model.{name.removesuffix('.weight')}.base_layer.weight"
        assert_close(ours[name], theirs.get(key, theirs.get(f"base_model.model.{name}")))
    assert gm.meta["lora_fx"].adapters["default"].config.init_lora_weights == init


def peft_param_name(name: str) -> str:
    """PEFT's in-memory name of a graph parameter (adapted base weights sit under base_layer)."""
    if ".lora_" not in name and name.endswith(".weight"):
        name = name[: -len(".weight")] + ".base_layer.weight"
    return "base_model.model." + name


def capture_case(case: str, method: str) -> tuple[torch.fx.GraphModule, torch.Tensor, list[str]]:
    """Capture `SITE_CASES[case]` in eval with `method`; return the graph, input and targets."""
    cls, make_x, targets = SITE_CASES[case]
    model, x = cls().eval(), make_x()
    return lora_fx.capture(model, (x,), method=method), x, targets


def injected_graph(flavour: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """An all-linear injected graph with LoRA dropout and random B, and its input ids.

    `flavour` "fx" / "export" captures a TinyBlockStack with that method; "llama" a tiny llama.
    """
    if flavour == "llama":
        model, ids = tiny_llama(layers=2), torch.randint(0, 256, (2, 16))
        gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    else:
        model, ids = TinyBlockStack(), torch.randint(0, 50, (2, 8))
        gm = lora_fx.capture(model, (ids,), method=flavour)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        lora_dropout=0.1,
        init_lora_weights=False,
    )
    return lora_fx.inject(gm, cfg), ids


def lm_pair(model, ids: torch.Tensor, cfg: dict, peft_model: Callable):
    """lora_fx and PEFT (`peft_model(copy)`) on a transformers LM, each seeded the same way.

    Checks the eval logits against PEFT's (and that the adapter changes them); returns
    `(gm, pm, expected logits)`.
    """
    from conftest import assert_close, assert_differs

    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    torch.manual_seed(1)
    pm = peft_model(copy.deepcopy(model)).eval()
    torch.manual_seed(1)
    gm = lora_fx.inject(gm, LoraConfig(**cfg))
    with torch.no_grad():
        expected = pm(ids, use_cache=False).logits
        assert_differs(expected, model(ids, use_cache=False).logits)
        assert_close(gm(ids).logits, expected)
    return gm, pm, expected


def assert_hotswap_refused(gm: torch.fx.GraphModule, folder, variant: str) -> None:
    """Hot-swapping a saved `variant` adapter into its own slot raises and changes nothing."""
    lora_fx.save_adapter(gm, folder)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(lora_fx.AdapterError, match=f"{variant} adapters are not supported"):
        lora_fx.load_adapter(gm, folder, hotswap=True)
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


def assert_mixed_batch_rows(gm: torch.fx.GraphModule, x: torch.Tensor) -> None:
    """With rows (default, base, default), each row equals its adapter's (or the base) output."""
    from conftest import assert_close

    with torch.no_grad():
        adapted = gm(x)
        with lora_fx.disable_adapters(gm):
            base = gm(x)
        with lora_fx.adapter_batch(gm, ["default", lora_fx.BASE, "default"]):
            mixed = gm(x)
    assert_close(mixed[0::2], adapted[0::2])
    assert_close(mixed[1], base[1])


def peft_and_loaded_graph(model, adapters: dict, targets: list[str], x, folder, **capture):
    """PEFT with `adapters` saved in `folder`, and `model` captured on `x` with them loaded.

    `adapters`: `{name: (r, lora_alpha[, own targets])}`, random A and B (init_lora_weights=False).
    """
    pm = None
    for name, (r, alpha, *own) in adapters.items():
        cfg = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=(own and own[0]) or targets,
            init_lora_weights=False,
        )
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(model), cfg, name)
        else:
            pm.add_adapter(name, cfg)
    pm.eval()
    pm.save_pretrained(folder)
    gm = lora_fx.capture(model, (x,), **capture)
    for name in adapters:
        lora_fx.load_adapter(gm, folder / name, name)
    return pm, gm


def assert_batch_grads_equal_alone(
    gm,
    ids,
    rows: list[str],
    out: Callable = lambda o: o,
    prepare: Callable = lambda gm: None,
) -> None:
    """Training a mixed batch gives each adapter the gradients it gets trained alone on its rows.

    `prepare(gm)` runs once the batch is set (aLoRA: `set_alora_offsets`, which also writes the
    offsets each adapter then reads alone).
    """
    from conftest import assert_close

    gm.train()
    lora_fx.set_adapter_batch(gm, rows)
    prepare(gm)
    params = dict(gm.named_parameters())
    out(gm(ids)).pow(2).sum().backward()
    mixed = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    assert mixed and all(".lora_" in k for k in mixed)
    lora_fx.set_adapter_batch(gm, None)
    for name in sorted(set(rows) - {lora_fx.BASE}):
        gm.zero_grad(set_to_none=True)
        lora_fx.set_adapter(gm, name)
        keep = torch.tensor([r == name for r in rows], dtype=torch.float32)
        loss = out(gm(ids)).pow(2).flatten(1).sum(1)
        (loss * keep).sum().backward()
        alone = {k: p.grad for k, p in params.items() if p.grad is not None}
        assert alone and all(f".{name}" in k for k in alone)
        for key, grad in alone.items():
            assert_close(mixed[key], grad)


def assert_slot_changes_do_not_recompile(
    gm,
    ids,
    *,
    load: tuple[str, object],
    delete: tuple[str, list[str]],
    expected: dict,
    out: Callable = lambda o: o,
) -> None:
    """Compiled once: loading into a free slot, new compositions and a delete change values only.

    `expected` maps row tuples to PEFT's outputs; `load` is (name, folder) of an adapter that
    fits a free slot; `delete` is (name, rows to run after deleting it).
    """
    from conftest import assert_close
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    try:
        with torch.no_grad():
            compiled(ids)
            torch._dynamo.config.error_on_recompile = True
            lora_fx.load_adapter(gm, load[1], load[0])  # into a free slot: values only
            for rows, want in expected.items():
                lora_fx.set_adapter_batch(gm, list(rows))
                assert_close(out(compiled(ids)), want)
            lora_fx.delete_adapter(gm, delete[0])  # frees its slot: values only
            lora_fx.set_adapter_batch(gm, delete[1])
            compiled(ids)
            assert counter.frame_count == 1
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def lora_roles(gm: torch.fx.GraphModule, adapter: str | None = None) -> Counter:
    """Count lora_fx nodes by role (optionally for one adapter)."""
    roles = Counter()
    for node in gm.graph.nodes:
        tag = node.meta.get("lora_fx")
        if tag and (adapter is None or tag["adapter"] == adapter):
            roles[tag["role"]] += 1
    return roles


def lora_adds(gm: torch.fx.GraphModule, adapter: str | None = None) -> int:
    """Branches joining a base output or weight, one per site call: role "add" nodes, counting
    the "auto" layout's pair (`weight_for_tokens` + `add_lora_for_tokens`) once."""
    from lora_fx.math.fused_ops import weight_for_tokens

    return sum(
        1
        for node in gm.graph.nodes
        if (tag := node.meta.get("lora_fx"))
        and tag["role"] == "add"
        and (adapter is None or tag["adapter"] == adapter)
        and node.target is not weight_for_tokens
    )


def assert_no_lora(gm: torch.fx.GraphModule) -> None:
    """No lora_fx node, parameter, module or state left."""
    gm.graph.lint()
    assert not lora_roles(gm)
    assert not [k for k in gm.state_dict() if ".lora_" in k], "LoRA parameters left behind"
    assert "lora_fx" not in gm.meta


class SeenMessages(logging.Handler):
    """A logging handler that keeps the message of every record it sees, at any level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def kill_loop(
    write: Callable[[int], None],
    check: Callable[[], str],
    *,
    kills: int = 24,
    max_delay: float = 0.15,
    seed: int = 0,
) -> tuple[Counter, int]:
    """Kill a writer at random moments; return `check()`'s outcomes and the writes completed.

    Each round forks a child (the test process has imported everything: a fork costs
    milliseconds) that calls `write(0)`, `write(1)`, `write(0)`, ... (or from `write(1)`) until it is sent SIGKILL
    after a random delay; then `check()` inspects what it left. A child that fails (rather than
    being killed) fails the test, so the loop cannot pass by writing nothing.
    """
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    writes = 0
    for _ in range(kills):
        first = rng.randrange(2)  # which version the child writes first
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: write until killed, one byte per completed write
            code = 1
            try:
                os.close(read_end)
                torch.set_num_threads(1)  # no OpenMP pool inherited across fork
                i = 0
                while True:
                    write((first + i) % 2)
                    os.write(write_end, b"w")
                    i += 1
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_end)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as done:
            writes += len(done.read())
        assert os.WIFSIGNALED(status), f"the writer exited by itself (status {status})"
        outcomes[check()] += 1
    return outcomes, writes
