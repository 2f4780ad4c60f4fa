"""onnxruntime-genai folders (`export_genai`): greedy tokens equal `PeftModel.generate`'s."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from models import save_tiny_tokenizer, tiny_causal_lm, tiny_gpt2, tiny_llama
from peft import LoraConfig as PeftConfig
from peft import get_peft_model

import lora_fx
from lora_fx import AdapterError, OnnxExportError
from lora_fx.cli import main
from lora_fx.exporters import check_ort_adapter, export_genai, genai_config, write_ort_adapter

NEW_TOKENS = 8


def _peft_model(base, adapters: dict[str, PeftConfig]):
    """A PeftModel with random (nonzero) adapters, in eval mode."""
    (first, cfg), *rest = adapters.items()
    peft_model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=first)
    for name, cfg in rest:
        peft_model.add_adapter(name, cfg)
    return peft_model.eval()


def _lora(targets, r=4, **kw) -> PeftConfig:
    return PeftConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kw)


def _peft_tokens(peft_model, prompt, adapter=None) -> list[int]:
    if adapter is None:
        with peft_model.disable_adapter():
            out = peft_model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    else:
        peft_model.set_adapter(adapter)
        out = peft_model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0].tolist()


def _genai_tokens(model, prompt, adapters=None, adapter=None) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(prompt.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama folder (weights + tokenizer), a PeftModel with adapters cat and dog saved,
    and the graph captured for generation with both loaded."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama().eval()
    base.save_pretrained(root / "model")
    save_tiny_tokenizer(root / "model")
    peft_model = _peft_model(
        base, {"cat": _lora("all-linear"), "dog": _lora(["q_proj", "v_proj"], r=2)}
    )
    peft_model.save_pretrained(root / "adapters")
    gm = lora_fx.capture_for_generation(base, max_batch_size=1, max_cache_len=32)
    for name in ("cat", "dog"):
        lora_fx.load_adapter(gm, root / "adapters" / name, adapter_name=name)
    return root, peft_model, gm


def test_merged_llama_greedy_tokens_equal_peft_generate(llama, tmp_path):
    root, peft_model, gm = llama
    lora_fx.set_adapter(gm, "cat")
    result = export_genai(gm, tmp_path / "out", tokenizer_dir=root / "model")
    assert sorted(p.name for p in result.folder.iterdir()) == [
        "genai_config.json",
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert result.config["model"]["type"] == "llama"
    assert result.model.layout == "merged" and result.adapters == {}
    prompt = torch.randint(3, 256, (1, 6))
    expected = _peft_tokens(peft_model, prompt, "cat")
    assert expected != _peft_tokens(peft_model, prompt, None)  # the adapter changes the tokens
    assert _genai_tokens(og.Model(str(result.folder)), prompt) == expected


OTHER_TYPES = {
    "qwen2": (lambda: tiny_causal_lm("qwen2"), "all-linear", {}, "qwen2"),
    "mistral": (
        lambda: tiny_causal_lm("mistral", sliding_window=None),
        "all-linear",
        {},
        "mistral",
    ),
    # genai's own "gpt2" type expects another graph; its generic "decoder" type runs this one.
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}, "decoder"),
}


@pytest.mark.parametrize("arch", list(OTHER_TYPES))
def test_merged_greedy_tokens_equal_peft_generate_for_other_types(arch, tmp_path):
    build, targets, extra, genai_type = OTHER_TYPES[arch]
    base = build().eval()
    peft_model = _peft_model(base, {"default": _lora(targets, **extra)})
    peft_model.save_pretrained(tmp_path / "adapter")
    gm = lora_fx.capture_for_generation(base, max_batch_size=1, max_cache_len=24)
    lora_fx.load_adapter(gm, tmp_path / "adapter")
    result = export_genai(gm, tmp_path / "out")
    assert result.config["model"]["type"] == genai_type
    prompt = torch.randint(3, 256, (1, 5))
    expected = _peft_tokens(peft_model, prompt, "default")
    assert _genai_tokens(og.Model(str(result.folder)), prompt) == expected


@pytest.fixture(scope="module")
def multi_lora(llama, tmp_path_factory):
    """The unmerged export: LoRA inputs + cat.onnx_adapter and dog.onnx_adapter."""
    _, _, gm = llama
    return export_genai(gm, tmp_path_factory.mktemp("multi") / "out", merged=False)


def test_two_adapters_per_request_from_one_loaded_model(llama, multi_lora):
    _, peft_model, _ = llama
    assert set(multi_lora.adapters) == {"cat", "dog"}
    assert multi_lora.model.layout == "inputs"
    model = og.Model(str(multi_lora.folder))
    adapters = og.Adapters(model)
    for name, path in multi_lora.adapters.items():
        adapters.load(str(path), name)
    prompt = torch.randint(3, 256, (1, 6))
    expected = {name: _peft_tokens(peft_model, prompt, name) for name in ("cat", "dog", None)}
    assert len({tuple(tokens) for tokens in expected.values()}) == 3  # not vacuous
    for name in ("cat", "dog", None, "cat"):  # switching back and forth, no reload
        assert _genai_tokens(model, prompt, adapters, name) == expected[name], name


def _write_raw_adapter(path, tensors: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    adapter.export_adapter(str(path))


def test_adapters_that_do_not_fit_are_refused_and_the_others_keep_working(
    llama, multi_lora, tmp_path
):
    root, _, _ = llama
    onnx_path = multi_lora.model.path
    site = "model.layers.0.self_attn.q_proj"
    ranks = tmp_path / "ranks.onnx_adapter"  # A rank 4, B rank 2
    _write_raw_adapter(
        ranks,
        {
            f"{site}.lora_A.weight": np.ones((4, 64), np.float32),
            f"{site}.lora_B.weight": np.ones((64, 2), np.float32),
        },
    )
    names = tmp_path / "names.onnx_adapter"
    _write_raw_adapter(names, {"model.nope.lora_A.weight": np.ones((2, 64), np.float32)})
    with pytest.raises(AdapterError, match=rf"{site}: A \(4, 64\) and B \(64, 2\) have different"):
        check_ort_adapter(ranks, onnx_path)
    with pytest.raises(AdapterError, match=r"not inputs of the model.*model\.nope"):
        check_ort_adapter(names, onnx_path)
    assert check_ort_adapter(multi_lora.adapters["cat"], onnx_path)
    # an adapter of another model (hidden 32) is refused when written with model=
    small = _peft_model(tiny_llama(hidden=32).eval(), {"default": _lora(["q_proj"])})
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(AdapterError, match="mis-shaped"):
        write_ort_adapter(tmp_path / "small", tmp_path / "small.onnx_adapter", model=onnx_path)
    assert not (tmp_path / "small.onnx_adapter").exists()

    # genai itself fails only when a request runs the bad adapter; the model and cat go on
    model = og.Model(str(multi_lora.folder))
    adapters = og.Adapters(model)
    adapters.load(str(multi_lora.adapters["cat"]), "cat")
    prompt = torch.randint(3, 256, (1, 6))
    before = _genai_tokens(model, prompt, adapters, "cat")
    for bad in (ranks, names):
        adapters.load(str(bad), bad.stem)
        with pytest.raises(RuntimeError):
            _genai_tokens(model, prompt, adapters, bad.stem)
    assert _genai_tokens(model, prompt, adapters, "cat") == before


def test_genai_config_has_the_graph_sizes_names_and_ids(llama):
    _, _, gm = llama
    config = genai_config(gm.meta["lora_fx_generation"], search={"top_k": 1})
    decoder = config["model"]["decoder"]
    assert config["model"]["context_length"] == config["search"]["max_length"] == 32
    assert (decoder["head_size"], decoder["num_key_value_heads"]) == (16, 2)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert config["model"]["eos_token_id"] == 2 and config["model"]["bos_token_id"] == 1
    assert config["search"]["past_present_share_buffer"] is False
    assert config["search"]["top_k"] == 1 and config["search"]["do_sample"] is False


def test_export_genai_refusals(llama, tmp_path):
    _, _, gm = llama
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(OnnxExportError, match="not empty; pass overwrite=True"):
        export_genai(gm, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    ids = torch.randint(0, 256, (1, 4))
    plain = lora_fx.capture(tiny_llama().eval(), (ids,), {"use_cache": False})
    with pytest.raises(OnnxExportError, match="capture_for_generation"):
        export_genai(plain, tmp_path / "out")
    with pytest.raises(OnnxExportError, match="no tokenizer files"):
        export_genai(gm, tmp_path / "out", tokenizer_dir=tmp_path / "busy")
    assert not (tmp_path / "out").exists()


def test_cli_genai_writes_a_folder_genai_loads(llama, tmp_path, capsys):
    root, peft_model, _ = llama
    out = tmp_path / "genai"
    args = ["export-onnx", "--genai", str(out), "--model", str(root / "model")]
    args += ["--adapter", f"cat={root / 'adapters' / 'cat'}", "--context-length", "32"]
    assert main([*args, "--batch", "1"]) == 0
    text = capsys.readouterr().out
    assert "genai type      llama" in text and "tokenizer.json" in text
    saved = json.loads((out / "genai_config.json").read_text())
    assert saved["model"]["context_length"] == 32
    prompt = torch.randint(3, 256, (1, 6))
    assert _genai_tokens(og.Model(str(out)), prompt) == _peft_tokens(peft_model, prompt, "cat")
