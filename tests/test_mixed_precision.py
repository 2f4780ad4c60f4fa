"""Mixed precision: bf16 autocast training; float32 adapters on bf16 bases (autocast_adapter_dtype).

PEFT is the oracle: the same weights go through `get_peft_model` and, via `save_pretrained` +
`lora_fx.load_adapter`, through lora_fx.
"""

from __future__ import annotations

import copy

import peft
import pytest
import safetensors.torch
import torch
import torch._dynamo
from conftest import assert_close
from helpers import lora_roles
from models import TinyEmbedding, tiny_llama

import lora_fx
from lora_fx import LoraConfig

BF16 = torch.bfloat16


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1))


def _pair(tmp_path, dtype: torch.dtype, *, autocast_adapter_dtype: bool = True):
    """A PEFT model and a lora_fx graph holding the same base and adapter weights."""
    model, ids = tiny_llama(layers=2).to(dtype), torch.randint(0, 256, (2, 16))
    gm = lora_fx.capture(copy.deepcopy(model), (ids,), {"use_cache": False})
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    pm.save_pretrained(tmp_path)
    if not autocast_adapter_dtype:  # load_adapter injects as PEFT's from_pretrained: float32
        saved = LoraConfig.from_json(str(tmp_path / "adapter_config.json"))
        lora_fx.inject(gm, saved, autocast_adapter_dtype=False)
    return pm, lora_fx.load_adapter(gm, tmp_path), ids


def _step(module, forward, *, autocast: bool, prefix: str = ""):
    """Loss, logits and LoRA gradients of one training step, optionally under bf16 autocast."""
    module.train()
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        logits = forward()
        loss = _loss(logits, forward.ids)
    loss.backward()
    grads = {
        n.removeprefix(prefix): p.grad for n, p in module.named_parameters() if p.requires_grad
    }
    return loss.detach(), logits.detach(), grads


def _forward(fn, ids, **kwargs):
    def forward():
        out = fn(ids, **kwargs)
        return out.logits

    forward.ids = ids
    return forward


def _assert_grads_close(grads: dict, expected: dict, max_rel: float) -> None:
    """float32 adapter gradients within `max_rel` relative Frobenius error of PEFT's."""
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        ref = expected[name]
        assert ref.norm() > 0, name
        assert ((grad - ref).norm() / ref.norm()).item() < max_rel, name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_bf16_autocast_training_matches_peft(tmp_path, compiled):
    torch._dynamo.reset()
    pm, gm, ids = _pair(tmp_path, torch.float32)
    assert not lora_roles(gm)["cast"], "a float32 adapter on a float32 base needs no cast"
    fn = torch.compile(gm, backend="aot_eager", fullgraph=True) if compiled else gm
    peft_loss, peft_logits, peft_grads = _step(
        pm, _forward(pm, ids, use_cache=False), autocast=True, prefix="base_model.model."
    )
    _, _, exact = _step(gm, _forward(gm, ids), autocast=False)  # float32 reference
    fused_loss, _, fused_grads = _step(gm, _forward(fn, ids), autocast=True)
    lora_fx.set_layout(gm, "plain")  # PEFT's op order, for a close comparison
    fn = torch.compile(gm, backend="aot_eager", fullgraph=True) if compiled else gm
    loss, logits, grads = _step(gm, _forward(fn, ids), autocast=True)
    assert logits.dtype == peft_logits.dtype == BF16
    assert_close(loss, peft_loss, dtype=BF16)
    assert_close(fused_loss, peft_loss, dtype=BF16)
    assert_close(logits, peft_logits, dtype=BF16)
    # bf16 matmuls sum a gradient's parts in the order autograd visits the branches, which
    # differs between the two graphs: ~0.5 % apart (relative Frobenius) on this model.
    _assert_grads_close(grads, peft_grads, max_rel=2e-2)
    # The fused layout rounds in other places: it must be as close to the float32 gradients
    # as PEFT's bf16 gradients are.
    for name, ref in exact.items():
        peft_err = (peft_grads[name] - ref).norm() / ref.norm()
        fused_err = (fused_grads[name] - ref).norm() / ref.norm()
        assert fused_err < 1.5 * peft_err + 1e-3, (name, fused_err.item(), peft_err.item())
    lora_fx.set_layout(gm, "fused")
    fn = torch.compile(gm, backend="aot_eager", fullgraph=True) if compiled else gm
    # A few steps under autocast: the loss falls, the adapter stays float32.
    optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss, _, _ = _step(gm, _forward(fn, ids), autocast=True)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert {p.dtype for p in lora_fx.trainable_parameters(gm).values()} == {torch.float32}
    torch._dynamo.reset()


def test_bf16_base_gets_float32_adapter_with_casts_like_peft(tmp_path):
    pm, gm, ids = _pair(tmp_path, BF16)
    assert {p.dtype for p in lora_fx.trainable_parameters(gm).values()} == {torch.float32}
    roles = lora_roles(gm)
    assert roles["cast"] == 2 * roles["lora_a"] == 28  # input and output of every linear branch
    peft_loss, peft_logits, peft_grads = _step(
        pm, _forward(pm, ids, use_cache=False), autocast=False, prefix="base_model.model."
    )
    loss, logits, grads = _step(gm, _forward(gm, ids), autocast=False)
    assert logits.dtype == BF16
    # PEFT rounds `y + delta` once; lora_fx rounds delta, then the sum: last-bit differences.
    assert_close(logits, peft_logits, dtype=BF16)
    assert_close(loss, peft_loss, dtype=BF16)
    # Every op rounds to bf16 and the rounding compounds through both layers: PEFT's own
    # gradients are ~2.5 % (relative Frobenius) from float32 ones, and lora_fx's about as far.
    _assert_grads_close(grads, peft_grads, max_rel=6e-2)
    # The saved file holds float32 factors, as PEFT's does.
    saved = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    lora_fx.save_adapter(gm, tmp_path / "fx")
    ours = safetensors.torch.load_file(str(tmp_path / "fx" / "adapter_model.safetensors"))
    assert ours.keys() == saved.keys()
    assert all(ours[k].dtype == saved[k].dtype == torch.float32 for k in ours)


def test_bf16_base_compiled_training_keeps_float32_adapter(tmp_path):
    torch._dynamo.reset()
    _, gm, ids = _pair(tmp_path, BF16)
    eager_loss, _, eager = _step(gm, _forward(gm, ids), autocast=False)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    loss, _, grads = _step(gm, _forward(compiled, ids), autocast=False)
    assert_close(loss, eager_loss)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert_close(grad, eager[name])
    torch._dynamo.reset()


def test_autocast_adapter_dtype_false_keeps_the_base_dtype(tmp_path):
    pm, gm, ids = _pair(tmp_path, BF16, autocast_adapter_dtype=False)
    assert {p.dtype for p in lora_fx.trainable_parameters(gm).values()} == {BF16}
    assert not lora_roles(gm)["cast"]
    pm.eval(), gm.eval()
    with torch.no_grad():
        expected = pm(ids, use_cache=False).logits
        fused = gm(ids).logits
        lora_fx.set_layout(gm, "plain")  # PEFT's rounding steps
        assert_close(gm(ids).logits, expected, dtype=BF16)
    # The fused layout rounds once where PEFT rounds three times: within one bf16 ulp of
    # the largest logits (|x| ~ 4 -> 0.03).
    torch.testing.assert_close(fused, expected, atol=4e-2, rtol=2e-2)


def test_embedding_site_casts_only_its_output():
    model, ids = TinyEmbedding().to(BF16), torch.randint(0, 100, (2, 5))
    gm = lora_fx.capture(model, (ids,))
    lora_fx.inject(gm, LoraConfig(target_modules=["emb", "lin0"], init_lora_weights=False))
    casts = [n for n in gm.graph.nodes if (n.meta.get("lora_fx") or {}).get("role") == "cast"]
    assert sorted(n.meta["lora_fx"]["site"] for n in casts) == ["emb", "lin0", "lin0"]
    assert gm(ids).dtype == BF16


def test_merge_of_float32_adapter_into_bf16_base(tmp_path):
    _, gm, ids = _pair(tmp_path, BF16)
    gm.eval()
    with torch.no_grad():
        unmerged = gm(ids).logits
        base = copy.deepcopy(gm)
        with lora_fx.disable_adapters(base):
            plain = base(ids).logits
        lora_fx.merge_and_unload(gm)
        assert not lora_roles(gm)
        merged = gm(ids).logits
    assert (unmerged - plain).abs().max() > 0.05  # the adapter matters
    assert_close(merged, unmerged, dtype=BF16)
