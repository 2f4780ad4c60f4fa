"""Model-folder workflows against PEFT's merge_and_unload, and every bad input."""

import copy
import importlib
import json
import logging
import os
import re
import socket

import pytest
import torch
from conftest import assert_close
from helpers import kill_loop
from models import tiny_llama
from peft import LoraConfig as PeftConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import lora_fx
from lora_fx import AdapterError, ConfigError, NoTargetMatchedError
from lora_fx.cli.model_folder import (
    FolderError,
    _progress_bars,
    _save,
    inspect_model_folder,
    merge_model_folder,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    model = tiny_llama().eval()
    model.save_pretrained(root / "model", max_shard_size="100KB")  # sharded safetensors
    (root / "model" / "tokenizer_config.json").write_text("{}")
    pm = get_peft_model(
        copy.deepcopy(model),
        PeftConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    ).eval()
    pm.save_pretrained(root / "adapter")
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        expected = pm.merge_and_unload()(ids).logits
    other = tiny_llama(hidden=32).eval()  # another base: shapes do not fit
    get_peft_model(other, PeftConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        root / "misfit"
    )
    return root, ids, expected


def test_merge_folder_equals_peft_merge(folders, tmp_path):
    root, ids, expected = folders
    summary = merge_model_folder(root / "model", root / "adapter", tmp_path / "out")
    assert summary.sites == 6
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert_close(merged(ids).logits, expected)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert sorted(
        p.name for p in (root / "model").iterdir() if p.suffix == ".safetensors"
    )  # untouched


def test_merge_folder_in_bfloat16(folders, tmp_path):
    root, ids, expected = folders
    merge_model_folder(root / "model", root / "adapter", tmp_path / "out", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        assert_close(merged(ids).logits.float(), expected, torch.bfloat16)


def test_bad_inputs_write_nothing(folders, tmp_path):
    root, _, _ = folders
    out = tmp_path / "out"
    with pytest.raises(FolderError, match=r"model folder '.*nope' does not exist"):
        merge_model_folder(root / "nope", root / "adapter", out)
    with pytest.raises(FolderError, match=r"has no adapter_config.json"):
        merge_model_folder(root / "model", root / "model", out)
    with pytest.raises(AdapterError, match=r"does not fit this graph: .*mis-shaped tensors"):
        merge_model_folder(root / "model", root / "misfit", out)
    assert not out.exists()
    bad = tmp_path / "ia3"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ConfigError, match=r"peft_type='IA3'; lora_fx reads only 'LORA'"):
        merge_model_folder(root / "model", bad, out)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FolderError, match=r"is not empty; pass --force"):
        merge_model_folder(root / "model", root / "adapter", out)
    with pytest.raises(FolderError, match=r"is \(inside\) the model folder"):
        merge_model_folder(root / "model", root / "adapter", root / "model")
    with pytest.raises(FolderError, match=r"dtype='int8' is invalid"):
        merge_model_folder(root / "model", root / "adapter", tmp_path / "o2", dtype="int8")
    assert (out / "keep.txt").read_text() == "x"


def test_force_replaces_output(folders, tmp_path):
    root, _, _ = folders
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    old_mask = os.umask(0o022)
    try:
        merge_model_folder(root / "model", root / "adapter", out, force=True)
    finally:
        os.umask(old_mask)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert os.listdir(tmp_path) == ["out"], "no temp folder is left"
    assert out.stat().st_mode & 0o777 == 0o755  # as save_pretrained makes it (umask 022)
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else None


def test_merge_force_killed_at_random_moments_leaves_old_or_new(folders, tmp_path):
    root, _, _ = folders
    models = [tiny_llama().eval() for _ in range(2)]  # two different merged models
    refs = []
    for i, model in enumerate(models):
        _save(model, root / "model", tmp_path / f"ref{i}", force=False)
        refs.append(_files(tmp_path / f"ref{i}"))
    assert refs[0] != refs[1]
    out = tmp_path / "runs" / "out"
    _save(models[0], root / "model", out, force=False)

    def check() -> str:
        found = _files(out)
        return (
            "absent"
            if found is None
            else next((str(i) for i, ref in enumerate(refs) if found == ref), "mixed")
        )

    # `_save` is `lora-fx merge --force`'s write step (load, capture, merge write nothing).
    with _progress_bars(False):
        outcomes, writes = kill_loop(lambda i: _save(models[i], root / "model", out, True), check)
    assert set(outcomes) <= {"0", "1"}, outcomes
    assert writes > 10, "the writer was killed before it wrote"
    _save(models[1], root / "model", out, force=True)  # removes what the killed writers left
    assert os.listdir(out.parent) == ["out"] and _files(out) == refs[1]


def test_inspect_lists_sites_and_peft_figures(folders):
    root, _, _ = folders
    report = inspect_model_folder(
        root / "model", lora_fx.LoraConfig(r=8, target_modules=["q_proj", "o_proj"])
    )
    assert [s["path"] for s in report["sites"]][:2] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
    ]
    q = report["sites"][0]
    assert (q["kind"], q["in"], q["out"], q["r"], q["lora_params"]) == (
        "linear",
        64,
        64,
        8,
        8 * 128,
    )
    totals = report["totals"]
    assert totals["sites"] == 4 and totals["lora_params"] == totals["trainable_params"]
    pm = get_peft_model(tiny_llama(), PeftConfig(r=8, target_modules=["q_proj", "o_proj"]))
    assert (totals["trainable_params"], totals["all_params"]) == pm.get_nb_trainable_parameters()
    with pytest.raises(NoTargetMatchedError, match=r"matched no site"):
        inspect_model_folder(root / "model", lora_fx.LoraConfig(target_modules=["nope"]))


def test_merge_folder_reports_the_bf16_rounding_loss(folders, tmp_path, caplog):
    root, _, _ = folders
    with caplog.at_level(logging.INFO, logger="lora_fx.passes.merge"):
        summary = merge_model_folder(
            root / "model", root / "adapter", tmp_path / "out", dtype="bfloat16"
        )
    logged = re.search(r"worst rounding loss (\S+)", caplog.text).group(1)
    assert summary.worst_rounding_loss > 0  # read after merge_and_unload: the report is kept
    assert f"{summary.worst_rounding_loss:.2e}" == logged


def test_merge_folder_leaves_process_state_as_it_was(folders, tmp_path, monkeypatch, capfd):
    """Offline without HF_HUB_OFFLINE, no bars without progress, bar settings as before after."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    root, _, _ = folders
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub_states = importlib.import_module("huggingface_hub.utils.tqdm").progress_bar_states
    saved_hub = dict(hub_states)
    seen_env = []
    real_load = AutoModelForCausalLM.from_pretrained.__func__

    def load(cls, *args, **kwargs):
        seen_env.append(os.environ.get("HF_HUB_OFFLINE"))
        return real_load(cls, *args, **kwargs)

    def no_network(*args, **kwargs):
        raise OSError("the network was reached")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(load))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    try:
        hf_logging.enable_progress_bar()
        disable_progress_bars("some_group")  # a user's own setting, kept through the call
        before = hf_logging.is_progress_bar_enabled(), dict(hub_states)
        capfd.readouterr()
        merge_model_folder(root / "model", root / "adapter", tmp_path / "out")
        err = capfd.readouterr().err
        after = hf_logging.is_progress_bar_enabled(), dict(hub_states)
    finally:
        hub_states.clear()
        hub_states.update(saved_hub)
    assert seen_env == [None]  # local_files_only keeps it offline; the env is not touched
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert after == before == (True, {"_global": True, "some_group": False})
