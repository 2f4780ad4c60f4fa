"""Smoke test of the whole pipeline, and the README's main job."""

import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import assert_close, assert_differs
from helpers import assert_no_lora
from models import TinyBlockStack

import lora_fx
from lora_fx import LoraConfig
from lora_fx.demo import run_demo

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("method", ["fx", "export"])
def test_capture_inject_step_merge_and_unload(method, tmp_path):
    model = TinyBlockStack().eval()
    ids = torch.randint(0, 50, (4, 6))
    gm = lora_fx.capture(model, (ids,), method=method)
    base = gm(ids).detach()
    lora_fx.inject(gm, LoraConfig(r=4, target_modules=["attn", "mlp", "embed"], lora_dropout=0.1))
    gm.train()
    opt = torch.optim.AdamW(lora_fx.trainable_parameters(gm).values(), lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(gm(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()
    trained = gm(ids).detach()
    assert_differs(trained, base)
    lora_fx.save_adapter(gm, tmp_path)
    lora_fx.merge_and_unload(gm)
    assert_no_lora(gm)
    assert_close(gm(ids), trained)


def test_demo_trains_merges_and_saves(tmp_path):
    figures = run_demo(str(tmp_path), steps=8, quiet=True)
    assert figures["loss_last"] < figures["loss_first"] - 0.3
    assert figures["merged_max_abs_diff"] < 1e-4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def _made_by_us(folder: Path) -> list[str]:
    """Temporary files and folders the examples could leave (library caches are not theirs)."""
    return [p.name for p in folder.iterdir() if p.name.startswith(("tmp", "lora_fx"))]


@pytest.mark.parametrize(
    "script", ["01_quickstart.py", "03_export_onnx.py", "06_unmerged_inference.py"]
)
def test_examples_run_and_clean_up(script, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "max |diff|" in out
    assert _made_by_us(tmp_path) == []


@pytest.mark.parametrize(
    "script", ["02_peft_interop.py", "05_replicate_layers.py", "08_architectures.py"]
)
def test_examples_with_peft_print_no_library_notices(script, tmp_path):
    """PEFT imports bitsandbytes (a log line on AVX512-BF16 CPUs) and warns through transformers."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0 and "max |diff|" in result.stdout, result.stderr
    assert result.stderr == ""
    assert _made_by_us(tmp_path) == []


@pytest.mark.parametrize("script", ["07_generate.py", "09_alora_generate.py"])
def test_generate_example_matches_peft_quietly(script, tmp_path):
    """examples/07 and 09: checkpoint folder -> capture_for_generation -> generate, vs PEFT."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "tokens equal PEFT's: True" in result.stdout
    assert result.stderr == ""
    assert _made_by_us(tmp_path) == []
