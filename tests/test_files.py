"""core/files.py: temp names, stale cleanup, permissions, folder replacement, the config check."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_fx import AdapterError
from lora_fx.core import files
from lora_fx.core.files import (
    CONFIG_DIGEST_KEY,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    atomic_write,
    clean_stale,
    config_digest,
    read_adapter_folder,
    replace_folder,
)


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(path, files_):
    path.mkdir()
    for name, text in files_.items():
        (path / name).write_text(text)
    return path


def _tree(path):
    return {p.name: p.read_text() for p in path.iterdir()}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_and_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("{}"))
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~mask
    new = files.make_temp_folder(tmp_path / "out")
    replace_folder(new, tmp_path / "out")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask


def test_clean_stale_removes_only_dead_writers_temp_names(tmp_path):
    target = tmp_path / "adapter_model.safetensors"
    dead, alive = _dead_pid(), os.getppid()
    old = time.time() - 2 * 3600
    removed = [
        f".adapter_model.safetensors.{dead}-0123abcd.tmp",  # a killed writer's file
        ".adapter_model.safetensors.k3j_x9a2.tmp",  # older lora_fx (mkstemp), an hour old
    ]
    kept = [
        f".adapter_model.safetensors.{alive}-0123abcd.tmp",  # a writer still running
        ".adapter_model.safetensors.q8w7e6r5.tmp",  # older naming, but recent
        ".adapter_model.safetensors.bak",  # not our naming
        f".adapter_config.json.{dead}-0123abcd.tmp",  # another target's
        "notes.tmp",
    ]
    for name in removed + kept:
        (tmp_path / name).write_text("x")
    os.utime(tmp_path / removed[1], (old, old))
    os.utime(tmp_path / kept[2], (old, old))
    stale_folder = tmp_path / f".adapter_model.safetensors.{dead}-99999999.tmp"
    stale_folder.mkdir()
    (stale_folder / "x").write_text("x")
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, target.name])
    assert clean_stale(target) == 0


def test_replace_folder_swaps_whole_folders(tmp_path):
    target = _folder(tmp_path / "out", {"a.json": "old", "b.bin": "old"})
    replace_folder(_folder(tmp_path / "new", {"c.json": "new"}), target)
    assert _tree(target) == {"c.json": "new"} and os.listdir(tmp_path) == ["out"]
    replace_folder(_folder(tmp_path / "new2", {"d": "2"}), tmp_path / "absent")
    assert _tree(tmp_path / "absent") == {"d": "2"}


def test_replace_folder_without_exchange_renames_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "out", {"a.json": "old"})
    replace_folder(_folder(tmp_path / "new", {"b.json": "new"}), target)
    assert _tree(target) == {"b.json": "new"} and os.listdir(tmp_path) == ["out"]

    # Killed between the two renames: `out` is absent, never mixed; both folders are whole.
    real_rename = os.rename

    def killed_on_second(src, dst):
        if os.path.basename(src) == "new":
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(_folder(tmp_path / "new", {"c.json": "newer"}), target)
    assert not target.exists()
    trees = [_tree(p) for p in tmp_path.iterdir()]
    assert sorted(trees, key=str) == [{"b.json": "new"}, {"c.json": "newer"}]


def _adapter_folder(path, config, tensors, metadata):
    path.mkdir(exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file(tensors, path / SAFETENSORS_NAME, metadata)


def test_weights_saved_with_another_config_are_refused(tmp_path):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin0"]}
    tensors = {"base_model.model.lin0.lora_A.weight": torch.ones(2, 3)}
    digest = config_digest(config)
    _adapter_folder(tmp_path, config, tensors, {"format": "pt", CONFIG_DIGEST_KEY: digest})
    cfg, read = read_adapter_folder(tmp_path)
    assert cfg.lora_alpha == 4 and read.keys() == tensors.keys()
    # Reformatted (key order, indentation): the same config.
    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(reversed(config.items()))))
    read_adapter_folder(tmp_path)
    # Another value: refused, naming the folder and what to do.
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": 8}))
    with pytest.raises(AdapterError, match=r"mixes two saves: .*Save the adapter again"):
        read_adapter_folder(tmp_path)
    # Weights without the key (PEFT's) are read unchecked.
    safetensors.torch.save_file(tensors, tmp_path / SAFETENSORS_NAME, {"format": "pt"})
    assert read_adapter_folder(tmp_path)[0].lora_alpha == 8
