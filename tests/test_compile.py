"""torch.compile(fullgraph=True) on injected graphs: train/eval, no recompiles, eager/PEFT parity.

Most cases use backend="aot_eager" (AOTAutograd's forward/backward split without code generation:
seconds, and the same random stream as eager, so dropout masks match); one case runs inductor.
"""

from __future__ import annotations

import copy
import runpy
from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import assert_close, assert_differs
from helpers import injected_graph
from models import tiny_llama

import lora_fx
from lora_fx import LoraConfig


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _loss(out, ids: torch.Tensor) -> torch.Tensor:
    logits = _logits(out)
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)
    )


def _grads(
    gm, fn, ids: torch.Tensor, seed: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one training step of `fn` (gm or its compiled form)."""
    gm.train()
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = _loss(fn(ids), ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora_fx.trainable_parameters(gm).items()}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("flavour", ["fx", "export", "llama"])
def test_fullgraph_train_eval_toggles_without_recompiles(flavour):
    gm, ids = injected_graph(flavour)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    gm.eval()
    with torch.no_grad():
        eager_eval = _logits(gm(ids))
    # Warm both modes once: dynamo guards on `training`, so each mode has its own graph.
    _grads(gm, compiled, ids)
    gm.eval()
    with torch.no_grad():
        compiled(ids)
    trainable = lora_fx.trainable_parameters(gm)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            gm.train()
            first, second = _logits(compiled(ids)), _logits(compiled(ids))
            assert_differs(first, second)  # LoRA dropout is live in train mode
            _loss(first, ids).backward()
            optimizer.step()
            optimizer.zero_grad()
            gm.eval()
            with torch.no_grad():
                a, b = _logits(compiled(ids)), _logits(compiled(ids))
            assert torch.equal(a, b)
    assert_differs(a, eager_eval)  # training moved the adapter; eval is checked against eager below
    with torch.no_grad():
        assert_close(a, _logits(gm(ids)))
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Frozen base weights: no gradient, no optimizer state.
    frozen = [p for n, p in gm.named_parameters() if n not in trainable]
    assert frozen and all(".lora_" in n for n in trainable)
    assert all(p.grad is None for p in frozen)
    assert {id(p) for p in optimizer.state} == {id(p) for p in trainable.values()}


@pytest.mark.parametrize("flavour", ["fx", "export", "llama"])
def test_compiled_gradients_equal_eager_with_dropout(flavour):
    gm, ids = injected_graph(flavour)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    eager_loss, eager = _grads(gm, gm, ids)
    loss, grads = _grads(gm, compiled, ids)
    assert eager.keys() == grads.keys() and len(eager) > 0
    assert_close(loss, eager_loss)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert_close(grad, eager[name])


def test_gradients_equal_peft_on_the_same_weights(tmp_path):
    import peft

    model, ids = tiny_llama(layers=2), torch.randint(0, 256, (2, 16))
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path)
    gm = lora_fx.load_adapter(gm, tmp_path)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)

    pm.train()
    peft_loss = _loss(pm(ids, use_cache=False), ids)
    peft_loss.backward()
    peft_grads = {
        n.removeprefix("base_model.model."): p.grad
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    loss, grads = _grads(gm, compiled, ids)
    assert grads.keys() == peft_grads.keys()
    assert_close(loss, peft_loss.detach())
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert_close(grad, peft_grads[name])


def test_inductor_train_step_matches_eager():
    """The one inductor case: a real compile of forward and backward (about 30 s here)."""
    model, ids = tiny_llama(layers=1), torch.randint(0, 256, (2, 16))
    gm = lora_fx.capture(model, (ids,), {"use_cache": False})
    gm = lora_fx.inject(gm, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    eager_loss, eager = _grads(gm, gm, ids)
    loss, grads = _grads(gm, torch.compile(gm, fullgraph=True), ids)
    # Inductor fuses and reorders float32 reductions (softmax, RMSNorm): ~1e-6 relative.
    tol = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(loss, eager_loss, **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager[name], **tol)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_example_04_learns_saves_and_merges(tmp_path):
    script = Path(__file__).parents[1] / "examples" / "04_train_llama.py"
    main = runpy.run_path(str(script))["main"]
    threads = torch.get_num_threads()
    try:
        figures = main(["--steps", "60", "--backend", "aot_eager", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the script sets 1 thread
    assert figures["loss_first"] > 5.0 > 1.0 > figures["loss_last"]
    assert figures["accuracy"] > 0.9
    assert figures["merged_max_abs_diff"] < 1e-4
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_dynamic_capture_compiles_at_two_shapes():
    model = tiny_llama().eval()
    gm = lora_fx.capture(model, (torch.randint(0, 256, (2, 8)),))  # dynamic batch and length
    # The rotary embedding's no_grad region is inlined: dynamo cannot retrace it with symbolic sizes.
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    assert not [n for n in gm.graph.nodes if n.target is hop]
    lora_fx.inject(gm, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for shape in [(2, 8), (3, 13), (1, 5)]:
            ids = torch.randint(0, 256, shape)
            assert_close(compiled(ids).logits, gm(ids).logits)
