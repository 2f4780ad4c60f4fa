"""`core/state.py`: passes given something other than a captured graph say what to call."""

import pytest
import torch
from models import TinyMLP

import lora_fx
from lora_fx import LoraConfig, NotAGraphModuleError

_PASSES = {
    "merge": lambda gm: lora_fx.merge(gm),
    "unmerge": lambda gm: lora_fx.unmerge(gm),
    "set_adapter": lambda gm: lora_fx.set_adapter(gm, "default"),
    "save_adapter": lambda gm: lora_fx.save_adapter(gm, "never_written"),
    "unload": lambda gm: lora_fx.unload(gm),
    "merge_and_unload": lambda gm: lora_fx.merge_and_unload(gm),
    "delete_adapter": lambda gm: lora_fx.delete_adapter(gm, "default"),
    "active_adapters": lambda gm: lora_fx.active_adapters(gm),
}


@pytest.fixture(scope="module")
def not_graphs():
    model = TinyMLP().eval()
    x = torch.randn(2, 10)
    return {"module": model, "program": torch.export.export(model, (x,))}


@pytest.mark.parametrize("name", sorted(_PASSES))
def test_passes_refuse_modules_and_programs_by_name(not_graphs, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, program = not_graphs["module"], not_graphs["program"]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        NotAGraphModuleError,
        match=r"expected a torch.fx.GraphModule from lora_fx.capture, got TinyMLP; capture the "
        r"model first: gm = lora_fx.capture\(model, args\)",
    ):
        _PASSES[name](model)
    with pytest.raises(
        TypeError,
        match=r"got a torch.export.ExportedProgram; .* call lora_fx.capture\(model, args\), or "
        r"pass the program to lora_fx.inject \(or load_adapter\), which accepts it",
    ):
        _PASSES[name](program)
    assert not (tmp_path / "never_written").exists()
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n])


def test_inject_still_accepts_a_program(not_graphs):
    gm = lora_fx.inject(not_graphs["program"], LoraConfig(target_modules=["lin0"]))
    assert lora_fx.active_adapters(gm) == ["default"]
