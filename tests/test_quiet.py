"""Scoped silencing: only the named notices are dropped, and only inside the block."""

import logging
import warnings

import pytest
from helpers import SeenMessages

from lora_fx.core.quiet import dropping_records, quiet_libraries

BNB = "bitsandbytes.backends.cpu.ops"
NO_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."


@pytest.fixture
def bnb_log():
    log = logging.getLogger(BNB)
    seen = SeenMessages()
    log.addHandler(seen)
    yield log, seen.messages
    log.removeHandler(seen)


def _state(name):
    log = logging.getLogger(name)
    return log.level, list(log.filters), log.disabled, log.propagate


def test_quiet_libraries_drops_the_bnb_kernels_notice_only_inside(bnb_log):
    log, seen = bnb_log
    before = _state(BNB), list(warnings.filters)
    with quiet_libraries():
        log.warning(NO_KERNELS, "No module named 'kernels'")
        log.warning("another bitsandbytes warning")
    log.warning(NO_KERNELS, "after the block")
    assert seen == ["another bitsandbytes warning", NO_KERNELS % "after the block"]
    assert (_state(BNB), list(warnings.filters)) == before


def test_quiet_libraries_ignores_one_future_warning_only_inside():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    assert [(type(w.message), str(w.message)) for w in caught] == [
        (FutureWarning, "something else is deprecated"),
        (UserWarning, "`is_gradient_checkpointing` is deprecated"),
        (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
    ]


def test_dropping_records_is_removed_on_error(bnb_log):
    log, seen = bnb_log
    with pytest.raises(RuntimeError), dropping_records(BNB, lambda r: True):
        log.warning("dropped")
        raise RuntimeError
    log.warning("kept")
    assert seen == ["kept"] and logging.getLogger(BNB).filters == []
