"""One real swarm per module: a registry and node processes on loopback, shared by its tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm


@pytest.fixture(scope="module")
def llama_swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """tiny-llama served as 0-3 + 4-7; the same weights also as `tiny-overlap` (0-4 + 3-7, overlapping)
    and as `tiny-partial` (0-3 only, so layers 4-7 are missing)."""
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_registry()
        swarm.start_node(tiny_llama, "0-3")
        swarm.start_node(tiny_llama, "4-7")
        swarm.start_node(tiny_llama, "0-4", "--model-name", "tiny-overlap")
        swarm.start_node(tiny_llama, "3-7", "--model-name", "tiny-overlap")
        swarm.start_node(tiny_llama, "0-3", "--model-name", "tiny-partial")
        swarm.wait_ready("tiny-llama")
        swarm.wait_ready("tiny-overlap")
        yield swarm


@pytest.fixture(scope="module")
def local_llama(tiny_llama: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def swarm_llama(tiny_llama: Path, llama_swarm: LocalSwarm) -> Iterator[DistributedModelForCausalLM]:
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=llama_swarm.registry_url)
    yield model
    model.close()
