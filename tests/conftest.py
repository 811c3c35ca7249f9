"""Fixtures shared by the whole suite: tiny checkpoints built once per session, and no deprecation left unseen.

transformers announces a removal two ways: a `FutureWarning` (made an error in this process by
`filterwarnings` in pyproject.toml, and in every child process by `PYTHONWARNINGS`) and, for renamed cache
arguments, a log line through its own logger. Both fail the suite, here and in the node processes' logs, so a
removal is handled before the release that makes it ships.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swarm.runtime import quiet_optional_backends
from tests.checkpoints import build_tiny_llama

torch.set_num_threads(1)
quiet_optional_backends()

DEPRECATION = re.compile(r"FutureWarning|DeprecationWarning|\bdeprecated\b", re.IGNORECASE)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8-layer random Llama with grouped-query attention, sharded across several safetensors files."""
    return build_tiny_llama(tmp_path_factory.mktemp("checkpoints") / "tiny-llama")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if DEPRECATION.search(message):
            self.messages.append(message)


@pytest.fixture(scope="session")
def _transformers_deprecations() -> Iterator[_Collect]:
    handler = _Collect()
    logger = logging.getLogger("transformers")  # its own root: it does not propagate to pytest's handlers
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def no_deprecation_logged_by_transformers(_transformers_deprecations: _Collect) -> Iterator[None]:
    seen = len(_transformers_deprecations.messages)
    yield
    new = _transformers_deprecations.messages[seen:]
    assert not new, f"transformers logged a deprecation: {new}"


@pytest.fixture(scope="session", autouse=True)
def no_deprecation_in_child_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Child processes (registries, nodes, CLIs) turn FutureWarnings into errors; their logs must not mention a
    deprecation either."""
    previous = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = "error::FutureWarning"
    yield
    if previous is None:
        os.environ.pop("PYTHONWARNINGS", None)
    else:
        os.environ["PYTHONWARNINGS"] = previous
    found = [
        f"{log.name}: {line.strip()}"
        for log in tmp_path_factory.getbasetemp().rglob("*.log")
        for line in log.read_text(errors="replace").splitlines()
        if DEPRECATION.search(line)
    ]
    assert not found, "child processes reported deprecations:\n" + "\n".join(found[:20])
