"""Every model family through a real swarm: two node processes per checkpoint, output equal to local `generate`,
gradients (soft prompts, adapters) equal to local autograd.

One swarm serves all families at once (each checkpoint's folder name is its model name), so the node
processes start in parallel and once for the whole module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.core.tuning import LowRankAdapter, SoftPrompt, Tuning
from swarm.client.local_swarm import LocalSwarm
from swarm.routing import Link
from tests.checkpoints import build_tiny
from tests.tuning_reference import HFSoftPromptModel, LocalTunedModel

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


def _gradients(model, tuning: Tuning) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.tensor([LONG])
    output = model(input_ids=ids, labels=ids, tuning=tuning)
    output.loss.backward()
    return float(output.loss.detach()), {name: p.grad for name, p in tuning.named_parameters()}


def _assert_same(swarm_side: tuple, local_side: tuple) -> None:
    assert abs(swarm_side[0] - local_side[0]) < 1e-5
    for name, grad in swarm_side[1].items():
        assert local_side[1][name].abs().max() > 1e-4, f"{name}: a zero gradient checks nothing"
        difference = (grad - local_side[1][name]).abs().max().item()
        assert difference < 1e-5, f"{name}: gradients differ by {difference:.3g}"


def test_soft_prompt_gradients_equal_local_transformers_autograd(
    remote: DistributedModelForCausalLM, local: PreTrainedModel
) -> None:
    """Through the swarm's two nodes, the gradient of the loss with respect to a soft prompt is what transformers'
    own autograd gives with the prompt as input embeddings."""
    width = remote.local.embed.weight.shape[1]
    embeddings = torch.randn(3, width, generator=torch.Generator().manual_seed(0)) * 0.5
    tuning = Tuning(remote.planner.model_name, SoftPrompt(embeddings))
    _assert_same(_gradients(remote, tuning), _gradients(HFSoftPromptModel(local), copy.deepcopy(tuning)))


def test_adapter_gradients_equal_local_autograd(
    remote: DistributedModelForCausalLM, family: str, checkpoints: dict[str, Path]
) -> None:
    generator = torch.Generator().manual_seed(1)
    lora = LowRankAdapter(remote.architecture.spec, 2, alpha=4, generator=generator)
    with torch.no_grad():
        for name, parameter in lora.pairs.items():
            if name.endswith("_b"):
                parameter.normal_(0, 0.2, generator=generator)
    tuning = Tuning(remote.planner.model_name, adapter=lora)
    reference = LocalTunedModel(checkpoints[family])
    _assert_same(_gradients(remote, tuning), _gradients(reference, copy.deepcopy(tuning)))


def test_gradients_through_three_hops_equal_local_autograd(
    remote: DistributedModelForCausalLM, family: str, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three hops (the first node's span in two parts, then the second node): a soft prompt and an adapter trained
    together get the gradients local autograd gives."""
    plan = remote.planner.plan
    planned: list[list[Link]] = []

    async def three_hops(*args: object, **kwargs: object) -> list[Link]:
        first, *rest = await plan(*args, **kwargs)
        middle = (first.start + first.end) // 2
        planned.append([Link(first.peer, first.start, middle), Link(first.peer, middle, first.end), *rest])
        return planned[-1]

    monkeypatch.setattr(remote.planner, "plan", three_hops)
    generator = torch.Generator().manual_seed(2)
    lora = LowRankAdapter(remote.architecture.spec, 2, alpha=4, layers=[0, 1, 3], generator=generator)
    with torch.no_grad():
        for name, parameter in lora.pairs.items():
            if name.endswith("_b"):
                parameter.normal_(0, 0.2, generator=generator)
    width = remote.local.embed.weight.shape[1]
    prompt = SoftPrompt(torch.randn(2, width, generator=generator) * 0.5)
    tuning = Tuning(remote.planner.model_name, prompt, lora)
    reference = LocalTunedModel(checkpoints[family])
    _assert_same(_gradients(remote, tuning), _gradients(reference, copy.deepcopy(tuning)))
    assert planned and all(len(chain) == 3 for chain in planned)
