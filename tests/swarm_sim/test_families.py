"""Every model family through a real swarm: two node processes per checkpoint, output equal to local `generate`.

One swarm serves all families at once (each checkpoint's folder name is its model name), so the node
processes start in parallel and once for the whole module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm
from tests.checkpoints import build_tiny

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

# One of each family and layout; Mistral, Qwen2 and Qwen3 differ from Llama only in spec fields covered in-process.
FAMILIES = (
    "llama",
    "mixtral",
    "qwen3_moe",
    "gpt_neox",
    "gptj",
    "opt",
    "bloom",
    "falcon-rotary",
    "falcon-alibi",
    "falcon-new",
    "gpt2",
)
PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7]])
SHORT, LONG = [1, 500, 400, 300], [1, 45, 67, 89, 120, 33, 250, 7, 99, 14]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny(family, root / f"tiny-{family}") for family in FAMILIES}


@pytest.fixture(scope="module")
def family_swarm(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """Layers 0-1 and 2-3 of every checkpoint, each on its own node."""
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_registry()
        for checkpoint in checkpoints.values():
            swarm.start_node(checkpoint, "0-1")
            swarm.start_node(checkpoint, "2-3")
        for checkpoint in checkpoints.values():
            swarm.wait_ready(checkpoint.name)
        yield swarm


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def local(family: str, checkpoints: dict[str, Path]) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def remote(
    family: str, checkpoints: dict[str, Path], family_swarm: LocalSwarm
) -> Iterator[DistributedModelForCausalLM]:
    model = DistributedModelForCausalLM.from_pretrained(checkpoints[family], registry=family_swarm.registry_url)
    yield model
    model.close()


def test_greedy_generation_equals_local_generate(remote: DistributedModelForCausalLM, local: PreTrainedModel) -> None:
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    swarm_output = remote.generate(PROMPT, **kwargs)
    local_output = local.generate(PROMPT, **kwargs)
    assert swarm_output.sequences.tolist() == local_output.sequences.tolist()
    for swarm_logits, local_logits in zip(swarm_output.logits, local_output.logits, strict=True):
        torch.testing.assert_close(swarm_logits, local_logits, atol=1e-4, rtol=0)


def test_left_padded_batch_equals_local_generate(remote: DistributedModelForCausalLM, local: PreTrainedModel) -> None:
    width = len(LONG)
    batch = torch.tensor([[0] * (width - len(SHORT)) + SHORT, LONG])
    mask = torch.tensor([[0] * (width - len(SHORT)) + [1] * len(SHORT), [1] * width])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert remote.generate(batch, **kwargs).tolist() == local.generate(batch, **kwargs).tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "mixtral"], indirect=True)
def test_beam_search_equals_local_beam_search(remote: DistributedModelForCausalLM, local: PreTrainedModel) -> None:
    kwargs = dict(max_new_tokens=10, num_beams=3, do_sample=False, num_return_sequences=2)
    assert remote.generate(PROMPT, **kwargs).tolist() == local.generate(PROMPT, **kwargs).tolist()
