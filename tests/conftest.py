"""Shared fixtures: a fixed seed for every test, one tolerance table, capture-method parametrization."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `import models` from tests and examples

# One table of tolerances, by dtype. float32: LoRA branches and merged weights differ from PEFT's
# only by summation order (~1e-6 on these tiny models).
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    logging.getLogger("lora_fx").setLevel(logging.INFO)


@pytest.fixture(scope="module")
def one_onnx_registry():
    """Build torch's ONNX op registry once per test file that asks: `torch.onnx.export` rebuilds
    it on every call (about 2 s). Test speed only; no test using it passes a
    custom_translation_table, which would change the shared registry."""
    from torch.onnx._internal.exporter import _registration

    real = getattr(_registration.ONNXRegistry, "from_torchlib", None)
    if real is None:  # another torch: export is just slower
        yield
        return
    cache = {}

    def from_torchlib(cls, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(from_torchlib))
        yield


def assert_close(actual, expected, dtype=torch.float32):
    """torch.testing.assert_close with the table's tolerance for `dtype`."""
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def assert_differs(a, b, min_diff=1e-3):
    """Guard against vacuous checks: the adapter must change the output."""
    assert (a - b).abs().max().item() > min_diff, (
        "adapter did not change the output; test is vacuous"
    )


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run tests marked slow (the whole architecture matrix; CI passes it)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: part of a matrix run with --run-slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow matrix: pass --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
