"""What a span is: the digests a node announces and a client expects agree exactly when the weights do."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from swarm.checkpoint import CheckpointIndex
from swarm.identity import CheckpointDigests, model_id, span_digest
from swarm.models import ModelArchitecture
from swarm.models.stack import LayerStack
from tests.checkpoints import build_tiny_llama, copy_tokenizer, save_checkpoint, tiny_llama_config


def loaded_digest(model: Path, start: int, end: int) -> str:
    """The digest a node computes while it reads layers [start, end)."""
    architecture = ModelArchitecture.of(model)
    stack = LayerStack.load(CheckpointIndex.open(model), architecture, start, end, torch.device("cpu"), torch.float32)
    return span_digest(stack.layer_digests)


def test_a_node_and_a_client_compute_the_same_digest_for_the_same_span(tiny_llama: Path) -> None:
    digests = CheckpointDigests(tiny_llama)
    for start, end in ((0, 8), (0, 3), (3, 8), (5, 6)):
        assert digests.span(start, end) == loaded_digest(tiny_llama, start, end)
    assert digests.known(0, 8) == digests.span(0, 8)
    assert digests.span(0, 4) != digests.span(4, 8)


def test_a_copy_is_the_same_model_and_a_reshard_keeps_the_weights(tiny_llama: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_llama, tmp_path / "copy"))
    assert model_id(copy) == model_id(tiny_llama)
    single = build_tiny_llama(tmp_path / "single", sharded=False)  # same seed, one file
    assert CheckpointDigests(single).span(0, 8) == CheckpointDigests(tiny_llama).span(0, 8)


def test_other_weights_or_another_architecture_are_told_apart(tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "reseeded").mkdir()
    reseeded = save_checkpoint(tiny_llama_config(copy_tokenizer(tmp_path / "reseeded")), tmp_path / "reseeded", seed=1)
    assert model_id(reseeded) == model_id(tiny_llama)  # same architecture...
    assert CheckpointDigests(reseeded).span(2, 4) != CheckpointDigests(tiny_llama).span(2, 4)  # ...other weights
    (tmp_path / "wider").mkdir()
    config = tiny_llama_config(copy_tokenizer(tmp_path / "wider"), intermediate_size=192)
    assert model_id(save_checkpoint(config, tmp_path / "wider")) != model_id(tiny_llama)
