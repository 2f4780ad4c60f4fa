"""`lora-fx merge / inspect / demo`: round trips against PEFT, exit codes, one-line errors."""

import copy
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import safetensors.torch
import torch
from conftest import assert_close
from models import tiny_llama
from peft import LoraConfig as PeftConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from lora_fx.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = tiny_llama().eval()
    model.save_pretrained(root / "model")
    pm = get_peft_model(
        copy.deepcopy(model),
        PeftConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False),
    )
    pm.eval().save_pretrained(root / "adapter")
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        expected = pm.merge_and_unload()(ids).logits
    get_peft_model(
        tiny_llama(hidden=32), PeftConfig(r=4, target_modules=["q_proj"])
    ).save_pretrained(root / "misfit")
    (root / "ia3").mkdir()
    (root / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    return root, ids, expected


def test_merge_command_equals_peft_merge(folders, tmp_path, capsys):
    root, ids, expected = folders
    code = main(
        [
            "merge",
            "--model",
            str(root / "model"),
            "--adapter",
            str(root / "adapter"),
            "--out",
            str(tmp_path / "out"),
            "-q",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and captured.out == ""
    assert captured.err == ""  # -q: no bar from save_pretrained's shard writer either
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert_close(merged(ids).logits, expected)


def test_merge_summary_gives_the_rounding_loss_of_a_bf16_merge(folders, tmp_path, capsys, caplog):
    root, _, _ = folders
    args = ["merge", "--model", str(root / "model"), "--adapter", str(root / "adapter")]
    with caplog.at_level(logging.INFO, logger="lora_fx.passes.merge"):
        assert main([*args, "--out", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    printed = re.search(r"worst rounding loss of a folded delta: (\S+)", capsys.readouterr().out)
    logged = re.search(r"worst rounding loss (\S+)", caplog.text)
    assert float(printed.group(1)) > 0 and printed.group(1) == logged.group(1)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("missing_model", r"model folder '.*nope' does not exist"),
        ("missing_adapter", r"adapter folder '.*nope' has no adapter_config.json"),
        ("misfit", r"does not fit this graph: .*mis-shaped tensors"),
        ("ia3", r"peft_type='IA3'; lora_fx reads only 'LORA'"),
    ],
)
def test_bad_inputs_one_line_exit_2_nothing_written(folders, tmp_path, which, message):
    root, _, _ = folders
    model, adapter = root / "model", root / "adapter"
    if which == "missing_model":
        model = root / "nope"
    elif which == "missing_adapter":
        adapter = root / "nope"
    elif which in ("misfit", "ia3"):
        adapter = root / which
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_fx",
            "merge",
            "--model",
            str(model),
            "--adapter",
            str(adapter),
            "--out",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-fx merge: error: "), result.stderr
    assert __import__("re").search(message, lines[0])
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_debug_shows_traceback_and_force_is_needed(folders, tmp_path, capsys):
    root, _, _ = folders
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    args = [
        "merge",
        "--model",
        str(root / "model"),
        "--adapter",
        str(root / "adapter"),
        "--out",
        str(out),
        "-q",
    ]
    assert main(args) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert main([*args, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


@pytest.mark.parametrize("broken", ["nan", "truncated"])
def test_broken_adapter_files_exit_2_naming_the_file_nothing_written(
    folders, tmp_path, capsys, broken
):
    root, _, _ = folders
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    if broken == "nan":
        tensors = safetensors.torch.load_file(weights)
        key = next(k for k in sorted(tensors) if "lora_B" in k)
        tensors[key][0, 0] = float("nan")
        safetensors.torch.save_file(tensors, weights)
        message = (
            r"the adapter '.*adapter' has NaN or Inf weights: merging it made 1 sites "
            r"non-finite .*; nothing was written. Pass --allow-non-finite"
        )
    else:
        weights.write_bytes(weights.read_bytes()[:100])
        message = r"cannot read '.*adapter_model.safetensors' \(SafetensorError: "
    out = tmp_path / "out"
    args = ["merge", "--model", str(root / "model"), "--adapter", str(adapter), "--out", str(out)]
    assert main([*args, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-fx merge: error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()
    if broken == "nan":
        assert main([*args, "-q", "--allow-non-finite"]) == 0
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert not all(torch.isfinite(p).all() for p in merged.parameters())


def test_inspect_table_and_json(folders, capsys):
    root, _, _ = folders
    assert (
        main(
            [
                "inspect",
                "--model",
                str(root / "model"),
                "--target-modules",
                "q_proj",
                "v_proj",
                "--r",
                "4",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert [s["path"] for s in report["sites"]] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    pm = get_peft_model(tiny_llama(), PeftConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert (
        report["totals"]["trainable_params"],
        report["totals"]["all_params"],
    ) == pm.get_nb_trainable_parameters()
    assert main(["inspect", "--model", str(root / "model")]) == 0
    out = capsys.readouterr().out
    assert (
        "model.layers.0.mlp.down_proj" in out and "14 sites" in out and "trainable params:" in out
    )


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "4", "-q", "--no-export"]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_demo_without_out_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "--steps", "2", "--no-export"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "removed the temporary folder" in capsys.readouterr().out


def test_help_reads_well():
    result = subprocess.run(
        [sys.executable, "-m", "lora_fx", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("merge", "inspect", "demo", "export-onnx"):
        assert command in result.stdout
