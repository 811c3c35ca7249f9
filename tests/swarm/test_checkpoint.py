"""Reading checkpoints tensor by tensor, sharded or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swarm.checkpoint import CheckpointIndex, read_tensors, tensor_nbytes
from swarm.errors import CheckpointError
from tests.checkpoints import build_tiny_llama


@pytest.fixture(scope="module")
def single_file_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("single") / "tiny-single", sharded=False)


def test_a_single_file_checkpoint_is_indexed_from_its_header(single_file_llama: Path) -> None:
    index = CheckpointIndex.open(single_file_llama)
    stored = load_file(single_file_llama / "model.safetensors")
    assert set(index.shard_of) == set(stored)
    names = index.names_with_prefix("model.layers.5.")
    tensors = read_tensors(index, names)
    assert all(torch.equal(tensors[name], stored[name]) for name in names)
    assert tensor_nbytes(index, names) == sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_sharded_checkpoint_is_indexed_from_its_index_file(tiny_llama: Path) -> None:
    index = CheckpointIndex.open(tiny_llama)
    assert len(set(index.shard_of.values())) > 1
    assert "model.layers.7.mlp.down_proj.weight" in index


def test_missing_folders_and_tensors_are_clear_errors(tmp_path: Path, tiny_llama: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        CheckpointIndex.open(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        CheckpointIndex.open(tmp_path)
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        read_tensors(CheckpointIndex.open(tiny_llama), ["model.layers.99.weight"])
