"""checkpoint_blocks / uncheckpoint_blocks: structure, equal gradients (eager, compiled), undo."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from conftest import assert_close
from helpers import injected_graph, lora_roles
from models import TinyBlockStack, TinyMLP

import lora_fx
from lora_fx.passes.checkpoint import CheckpointedBlock

BLOCKS = {
    "fx": ["layers.0", "layers.1", "layers.2"],
    "export": ["layers.0", "layers.1", "layers.2"],
    "llama": ["model.layers.0", "model.layers.1"],
}


def _step(gm, ids: torch.Tensor, fn=None, seed: int = 1):
    """Loss and LoRA gradients of one training step (same seed: same dropout masks)."""
    gm.train()
    gm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = (fn if fn is not None else gm)(ids)
    logits = out.logits if hasattr(out, "logits") else out
    loss = logits.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora_fx.trainable_parameters(gm).items()}


@pytest.mark.parametrize("flavour", ["fx", "export", "llama"])
def test_blocks_move_into_checkpointed_modules_and_names_stay(flavour):
    gm, _ = injected_graph(flavour)
    params = [n for n, _ in gm.named_parameters()]
    keys = list(gm.state_dict())
    nodes = len(gm.graph.nodes)
    assert lora_fx.checkpoint_blocks(gm) is gm
    gm.graph.lint()
    assert lora_fx.checkpointed_blocks(gm) == BLOCKS[flavour]
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and "checkpoint" in n.target]
    assert len(calls) == len(BLOCKS[flavour])
    assert all(isinstance(gm.get_submodule(c.target), CheckpointedBlock) for c in calls)
    assert len(gm.graph.nodes) < nodes
    # Only the head's branch (outside the blocks) is left in the outer graph.
    assert lora_roles(gm)["add"] == (0 if flavour == "llama" else 1)
    # Nothing registered twice: parameter names and state_dict keys are unchanged.
    assert [n for n, _ in gm.named_parameters()] == params
    assert list(gm.state_dict()) == keys
    assert all(not list(gm.get_submodule(c.target).parameters()) for c in calls)


@pytest.mark.parametrize("flavour", ["fx", "export", "llama"])
def test_gradients_equal_without_checkpointing(flavour):
    gm, ids = injected_graph(flavour)
    base_loss, base = _step(gm, ids)
    lora_fx.checkpoint_blocks(gm)
    loss, grads = _step(gm, ids)
    # Same ops on the same inputs, dropout masks replayed from the saved RNG state: bitwise.
    assert torch.equal(loss, base_loss)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(grad, base[name]), name
    gm.eval()
    with torch.no_grad():
        out = gm(ids)
    lora_fx.uncheckpoint_blocks(gm)
    with torch.no_grad():
        assert_close(getattr(out, "logits", out), getattr(gm(ids), "logits", gm(ids)))


@pytest.mark.parametrize("flavour", ["export", "llama"])
def test_compiled_checkpointed_gradients_equal_eager(flavour):
    torch._dynamo.reset()
    gm, ids = injected_graph(flavour)
    base_loss, base = _step(gm, ids)
    lora_fx.checkpoint_blocks(gm)
    loss, grads = _step(gm, ids, torch.compile(gm, backend="aot_eager", fullgraph=True))
    assert_close(loss, base_loss)
    for name, grad in grads.items():
        assert_close(grad, base[name])
    torch._dynamo.reset()


def test_uncheckpoint_restores_the_flat_graph_for_other_passes(tmp_path):
    gm, ids = injected_graph("llama")
    ops = [(n.op, str(n.target)) for n in gm.graph.nodes]
    roles = lora_roles(gm)
    lora_fx.checkpoint_blocks(gm)
    _step(gm, ids)
    assert lora_fx.uncheckpoint_blocks(gm) is gm
    gm.graph.lint()
    assert lora_fx.checkpointed_blocks(gm) == []
    assert [(n.op, str(n.target)) for n in gm.graph.nodes] == ops
    assert lora_roles(gm) == roles
    assert not any("checkpoint" in name for name, _ in gm.named_modules())
    gm.eval()
    with torch.no_grad():
        trained = gm(ids).logits
    lora_fx.save_adapter(gm, tmp_path)
    lora_fx.merge_and_unload(gm)
    with torch.no_grad():
        assert_close(gm(ids).logits, trained)


def test_deepcopy_of_a_checkpointed_graph_is_independent():
    gm, ids = injected_graph("fx")
    lora_fx.checkpoint_blocks(gm)
    twin = copy.deepcopy(gm)
    _, grads = _step(gm, ids)
    _, twin_grads = _step(twin, ids)
    for name, grad in grads.items():
        assert torch.equal(grad, twin_grads[name]), name
    with torch.no_grad():
        for p in lora_fx.trainable_parameters(twin).values():
            p.zero_()
    twin.eval(), gm.eval()
    assert not torch.equal(twin(ids), gm(ids)), "the copy's blocks must read the copy's weights"


def test_named_blocks_only():
    gm, ids = injected_graph("export")
    _, base = _step(gm, ids)
    lora_fx.checkpoint_blocks(gm, ["layers.1"])
    assert lora_fx.checkpointed_blocks(gm) == ["layers.1"]
    _, grads = _step(gm, ids)
    for name, grad in grads.items():
        assert torch.equal(grad, base[name]), name


def test_errors():
    gm, _ = injected_graph("export")
    with pytest.raises(ValueError, match=r"blocks=\['layers.7'\] are not blocks of this graph"):
        lora_fx.checkpoint_blocks(gm, ["layers.7"])
    lora_fx.checkpoint_blocks(gm)
    with pytest.raises(ValueError, match="already checkpointed"):
        lora_fx.checkpoint_blocks(gm)
    mlp = lora_fx.capture(TinyMLP(), (torch.randn(2, 10),))
    with pytest.raises(ValueError, match="no repeated blocks"):
        lora_fx.checkpoint_blocks(mlp)


def test_lora_passes_refuse_a_checkpointed_graph():

    import lora_fx

    ids = torch.randint(0, 50, (2, 5))
    gm = lora_fx.capture(TinyBlockStack().eval(), (ids,))
    lora_fx.inject(gm, lora_fx.LoraConfig(target_modules=["attn"]))
    lora_fx.checkpoint_blocks(gm)
    code = gm.code
    with pytest.raises(
        lora_fx.AdapterError,
        match=r"3 checkpointed blocks \(e.g. .layers.0.\); call lora_fx.uncheckpoint_blocks",
    ):
        lora_fx.merge(gm)
    with pytest.raises(lora_fx.AdapterError, match=r"checkpointed blocks"):
        lora_fx.inject(gm, lora_fx.LoraConfig(target_modules=["mlp"]), "other")
    assert gm.code == code
    lora_fx.uncheckpoint_blocks(gm)
    lora_fx.merge(gm)
