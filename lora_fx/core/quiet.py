"""Scoped silencing of library messages a user cannot act on.

    with quiet_libraries():            lora_fx's commands, `python -m lora_fx.demo`, the examples
    with dropping_records(logger, match):      one logger's matching records, for one call

Rules:
1. Narrow: one logger and the records that match one message (a `logging` filter, never a level),
   or one warning category and message; never every warning or a whole logger.
2. Scoped: everything is a context manager; on exit the filters it added are removed and the
   `warnings` filters are as before (`warnings.catch_warnings`).
3. `quiet_libraries` drops messages about the environment, not about the user's work:
   - bitsandbytes on AVX512-BF16 CPUs logs at import that the optional `kernels` package is
     missing (it falls back to its own kernel); PEFT imports bitsandbytes whenever it is installed;
   - PEFT reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning per model).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

__all__ = ["dropping_bitsandbytes_notice", "dropping_records", "quiet_libraries"]

_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_NO_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community"
_FUTURE_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


@contextlib.contextmanager
def dropping_records(logger: str, match: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """The records of `logger` (itself, not its children) that `match` are dropped in the block."""
    target = logging.getLogger(logger)

    def keep(record: logging.LogRecord) -> bool:
        return not match(record)

    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def dropping_bitsandbytes_notice() -> contextlib.AbstractContextManager[None]:
    """Bitsandbytes' import-time "no `kernels` package" notice is dropped in the block (rule 3)."""

    def no_kernels(record: logging.LogRecord) -> bool:
        return str(record.msg).startswith(_BNB_NO_KERNELS)

    return dropping_records(_BNB_LOGGER, no_kernels)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """The library messages of rule 3 are dropped in the block; the rest is untouched."""
    with dropping_bitsandbytes_notice(), warnings.catch_warnings():
        for message in _FUTURE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield
