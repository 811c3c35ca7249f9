"""Fixtures shared by the whole suite: tiny checkpoints built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import build_tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8-layer random Llama with grouped-query attention, sharded across several safetensors files."""
    return build_tiny_llama(tmp_path_factory.mktemp("checkpoints") / "tiny-llama")
