"""36 transformers architectures end to end against PEFT (tiny configs, random weights).

For each architecture and two configs (`all-linear`, and the attention projections a user names
by hand, r=4, `init_lora_weights=False`), with the model captured by `torch.export`:
1. PEFT's saved adapter loads into the graph and gives PEFT's outputs;
2. `merge_and_unload` gives PEFT's merged outputs;
3. lora_fx's own adapter (same config) is saved with the keys and target lists PEFT writes, and
   PEFT loads it and gives lora_fx's outputs;
4. the graph with PEFT's adapter, compiled (`aot_eager`), gives PEFT's outputs.
`FAST_ARCHS` (one of each family, and every past cause of failure) run by default; the rest are
marked `slow` and run with `--run-slow` (CI does).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from architectures import ARCHS, FAST_ARCHS
from conftest import assert_differs

import lora_fx

_TOL = {"atol": 1e-4, "rtol": 1e-4}  # the bound; float32 sums differ ~1e-6 here
_CONFIGS = ("all-linear", "named")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _params(names: list[str]):
    return [pytest.param(n, marks=() if n in FAST_ARCHS else pytest.mark.slow, id=n) for n in names]


_CASES = [
    pytest.param(a, c, marks=() if a in FAST_ARCHS else pytest.mark.slow, id=f"{a}-{c}")
    for a in ARCHS
    for c in _CONFIGS
]


def _lora_config(arch: str, config: str) -> dict[str, Any]:
    if config == "all-linear":
        return {"target_modules": "all-linear", "r": 4}
    return {"target_modules": ARCHS[arch].targets, "r": 4, "lora_alpha": 16}


def _first(output: Any) -> torch.Tensor:
    """The tensor a test compares: logits, CLIP's image logits, or the first output."""
    for name in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return torch.utils._pytree.tree_leaves(output)[0]


class _Run:
    """One architecture: its model, inputs and graph, and PEFT's results per config (cached)."""

    def __init__(self, arch: str, tmp_path_factory) -> None:
        torch.manual_seed(0)
        self.arch = arch
        self.model = ARCHS[arch].build()
        self.args, self.kwargs = ARCHS[arch].inputs()
        self.gm = lora_fx.capture(copy.deepcopy(self.model), self.args, dict(self.kwargs))
        self._tmp = tmp_path_factory
        self.peft: dict[str, dict[str, Any]] = {}
        with torch.no_grad():
            self.base = _first(self.model(*self.args, **self.kwargs))

    def __call__(self, module: Any) -> torch.Tensor:
        with torch.no_grad():
            return _first(module(*self.args, **self.kwargs))

    def graph(self) -> torch.fx.GraphModule:
        return copy.deepcopy(self.gm)

    def oracle(self, config: str) -> dict[str, Any]:
        """PEFT's outputs (unmerged, merged) and saved folder for one config."""
        if config not in self.peft:
            cfg = peft.LoraConfig(**_lora_config(self.arch, config), init_lora_weights=False)
            pm = peft.get_peft_model(copy.deepcopy(self.model), cfg).eval()
            folder = self._tmp.mktemp(f"{self.arch}-{config}")
            out = self(pm)
            pm.save_pretrained(folder)
            merged = self(pm.merge_and_unload())
            assert_differs(merged, self.base, min_diff=5 * _TOL["atol"])
            self.peft[config] = {"out": out, "merged": merged, "folder": folder}
        return self.peft[config]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[str, _Run] = {}

    def get(arch: str) -> _Run:
        if arch not in cache:
            cache.clear()  # one architecture at a time keeps memory flat
            cache[arch] = _Run(arch, tmp_path_factory)
        return cache[arch]

    return get


def _expected_unmerged(run: _Run, config: str) -> torch.Tensor:
    """PEFT's unmerged output, or its merged one where its unmerged forward drops a LoRA."""
    oracle = run.oracle(config)
    if config in ARCHS[run.arch].peft_unmerged_is_wrong:
        assert (oracle["out"] - oracle["merged"]).abs().max() > 1e-3, "PEFT fixed: update notes"
        return oracle["merged"]
    return oracle["out"]


def _keys(folder) -> set[str]:
    return set(safetensors.torch.load_file(str(folder / "adapter_model.safetensors")))


def _targets(folder) -> tuple[set, set]:
    data = json.loads((folder / "adapter_config.json").read_text())
    return set(data["target_modules"] or ()), set(data.get("target_parameters") or ())


@pytest.mark.parametrize(("arch", "config"), _CASES)
def test_peft_adapter_and_merge_match_peft(arch, config, runs):
    run = runs(arch)
    oracle = run.oracle(config)
    gm = lora_fx.load_adapter(run.graph(), oracle["folder"])
    torch.testing.assert_close(run(gm), _expected_unmerged(run, config), **_TOL)
    merged = lora_fx.merge_and_unload(gm)
    assert not [n for n in merged.graph.nodes if "lora_fx" in n.meta]
    torch.testing.assert_close(run(merged), oracle["merged"], **_TOL)


@pytest.mark.parametrize(("arch", "config"), _CASES)
def test_lora_fx_adapter_is_peft_s_file_and_loads_in_peft(arch, config, runs, tmp_path):
    run = runs(arch)
    cfg = lora_fx.LoraConfig(**_lora_config(arch, config), init_lora_weights=False)
    gm = lora_fx.inject(run.graph(), cfg)
    lora_fx.save_adapter(gm, tmp_path)
    theirs = run.oracle(config)["folder"]
    assert _keys(tmp_path) == _keys(theirs)  # the same sites, named the same
    assert _targets(tmp_path)[1] == _targets(theirs)[1]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(run.model), tmp_path).eval()
    ours = run(gm)
    assert_differs(ours, run.base, min_diff=5 * _TOL["atol"])
    expected = run(pm.merge_and_unload() if config in ARCHS[arch].peft_unmerged_is_wrong else pm)
    torch.testing.assert_close(ours, expected, **_TOL)


@pytest.mark.parametrize("arch", _params(list(ARCHS)))
def test_compiled_graph_matches_peft(arch, runs):
    run = runs(arch)
    gm = lora_fx.load_adapter(run.graph(), run.oracle("named")["folder"])
    compiled = torch.compile(gm, backend="aot_eager")
    torch.testing.assert_close(run(compiled), run.oracle("named")["out"], **_TOL)
