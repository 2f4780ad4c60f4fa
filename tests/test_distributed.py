"""Injected graphs train under torch.distributed DDP, FSDP2 and DTensor tensor parallelism.

Each test spawns 2 ranks (CPU processes, gloo). DDP / FSDP2: the ranks train the same captured,
injected tiny Llama on their halves of a batch, then the parent checks that the LoRA parameters
are identical on both ranks, equal a single-process run on the whole batch, and rank 0 alone wrote
the full adapter. Tensor parallel: the README recipe shards the graph's parameters as DTensors
(Megatron column / row split); outputs, LoRA gradients and the saved file equal one process's.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close

import lora_fx
from lora_fx import LoraConfig

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"
)

WORLD = 2
STEPS = 3
BATCH, SEQ = 4, 16  # global batch; each rank trains on BATCH // WORLD rows


def _setup(rows: int = BATCH // WORLD):
    """The same model, adapter and data in every process (seeded); captured for `rows` rows."""
    sys.path.insert(0, str(Path(__file__).parent))
    from models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=64)
    ids = torch.randint(0, 256, (BATCH, SEQ))
    gm = lora_fx.capture(model, (ids[:rows],), {"use_cache": False})
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return lora_fx.inject(gm, cfg), ids


def _loss(module, ids: torch.Tensor) -> torch.Tensor:
    logits = module(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _train(module, gm, ids: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-2)
    gm.train()
    for _ in range(STEPS):
        _loss(module, ids).backward()
        optimizer.step()
        optimizer.zero_grad()


def _lora_state(gm) -> dict[str, torch.Tensor]:
    """Full (gathered) LoRA parameters by name."""
    out = {}
    for name, param in lora_fx.trainable_parameters(gm).items():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = full.detach().clone()
    return out


def _worker(rank: int, mode: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        gm, ids = _setup()
        local = ids.chunk(WORLD)[rank]
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(gm)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            module = fully_shard(gm, mesh=init_device_mesh("cpu", (WORLD,)))
            frozen = [p for p in gm.parameters() if not p.requires_grad]
            assert type(frozen[0]).__name__ == "DTensor", "fully_shard did not shard the graph"
        _train(module, gm, local)
        frozen_grads = [
            n for n, p in gm.named_parameters() if not p.requires_grad and p.grad is not None
        ]
        assert not frozen_grads, f"frozen parameters got gradients: {frozen_grads[:3]}"
        torch.save(_lora_state(gm), Path(out_dir) / f"rank{rank}.pt")
        # Every rank gathers (a collective); only rank 0 writes, into its own folder here.
        lora_fx.save_adapter(gm, Path(out_dir) / f"adapter{rank}", is_main_process=rank == 0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def assert_close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """LoRA parameters after the same steps in one process on the whole batch."""
    gm, ids = _setup(rows=BATCH)
    assert_close_states(_lora_state(gm), _lora_state(_setup()[0]))  # same start as the ranks
    _train(gm, gm, ids)
    return _lora_state(gm)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process_on_the_whole_batch(mode, reference, tmp_path):
    mp.spawn(_worker, args=(mode, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    gm0, _ = _setup()
    initial = _lora_state(gm0)
    assert set(ranks[0]) == set(reference) == set(initial)
    for name, value in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        # Averaging gradients over ranks sums in another order than one big batch: ~1e-7.
        assert_close(ranks[0][name], value)
    # save_adapter: rank 0 alone wrote the full (gathered) tensors; they load into a fresh graph.
    assert not (tmp_path / "adapter1").exists()
    written = safetensors.torch.load_file(str(tmp_path / "adapter0" / "adapter_model.safetensors"))
    assert len(written) == len(reference)
    loaded = lora_fx.load_adapter(_setup()[0], tmp_path / "adapter0")
    for name, value in _lora_state(loaded).items():
        assert torch.equal(value, ranks[0][name]), name


# Tensor parallel (README "Tensor parallel"): column-parallel sites split the output dim (W, b
# and lora_B: Shard(0); lora_A replicated), row-parallel sites the input dim (W and lora_A:
# Shard(1); b and lora_B replicated). Everything else is left as plain tensors.
_TP_PLAN = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), "colwise"),
    **dict.fromkeys(("o_proj", "down_proj"), "rowwise"),
}
_TP_SHARD_DIM = {  # (style, tensor) -> Shard dim; absent: Replicate
    ("colwise", "weight"): 0,
    ("colwise", "bias"): 0,
    ("colwise", "lora_B"): 0,
    ("rowwise", "weight"): 1,
    ("rowwise", "lora_A"): 1,
}


def _tensor_parallel(gm, mesh) -> None:
    """The README recipe: export's metadata asserts out, plan sites' parameters as DTensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    for node in gm.graph.find_nodes(
        op="call_function", target=torch.ops.aten._assert_tensor_metadata.default
    ):
        gm.graph.erase_node(node)  # no DTensor sharding rule; a check only
    gm.recompile()
    for name, param in list(gm.named_parameters()):
        parts = name.split(".")  # <site>.weight or <site>.lora_A.<adapter>.weight
        split = parts.index("lora_A") if "lora_A" in parts else None
        split = parts.index("lora_B") if "lora_B" in parts else split
        site = parts[: len(parts) - 1 if split is None else split]
        style = _TP_PLAN.get(site[-1])
        if style is None:
            continue
        dim = _TP_SHARD_DIM.get((style, parts[-1] if split is None else parts[split]))
        placement = Replicate() if dim is None else Shard(dim)
        dparam = distribute_tensor(param.detach(), mesh, [placement])
        owner = gm.get_submodule(".".join(parts[:-1]))
        setattr(owner, parts[-1], torch.nn.Parameter(dparam, param.requires_grad))


def _tp_step(gm, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and LoRA gradients of one forward / backward (math SDPA: see the README)."""
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with implicit_replication(), sdpa_kernel([SDPBackend.MATH]):
        logits = gm(ids).logits
        if hasattr(logits, "full_tensor"):
            logits = logits.full_tensor()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    grads = {}
    for name, param in lora_fx.trainable_parameters(gm).items():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name] = grad.clone()
    return logits.detach(), grads


def _tp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        gm, ids = _setup(rows=BATCH)
        _tensor_parallel(gm, init_device_mesh("cpu", (WORLD,)))
        local = gm.get_submodule("model.layers.0.mlp.up_proj").weight.to_local()
        assert (
            local.shape[0]
            == gm.get_submodule("model.layers.0.mlp.down_proj").weight.shape[1] // WORLD
        )
        logits, grads = _tp_step(gm, ids)
        torch.save({"logits": logits, "grads": grads}, Path(out_dir) / f"tp{rank}.pt")
        lora_fx.save_adapter(gm, Path(out_dir) / f"adapter{rank}", is_main_process=rank == 0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_dtensor_graph_matches_one_process(tmp_path):
    mp.spawn(_tp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    gm, ids = _setup(rows=BATCH)
    logits, grads = _tp_step(gm, ids)
    lora_fx.save_adapter(gm, tmp_path / "reference")
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"tp{rank}.pt", weights_only=True)
        # Sharded GEMMs (and the row-parallel all-reduce) sum in another order: ~5e-7.
        assert_close(got["logits"], logits)
        assert got["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            assert grad.abs().max() > 0, f"{name} got no gradient"
            assert_close(got["grads"][name], grad)
    # save_adapter gathers the shards; rank 0 alone wrote what one process writes: the same
    # config and the same tensors (compared as tensors: bytes also carry the header layout).
    assert not (tmp_path / "adapter1").exists()
    for file in ("adapter_config.json",):
        assert (tmp_path / "adapter0" / file).read_text() == (
            tmp_path / "reference" / file
        ).read_text()
    ours = safetensors.torch.load_file(tmp_path / "adapter0" / "adapter_model.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
