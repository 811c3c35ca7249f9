"""Speculative decoding with the draft model shipped for the embedded demo model: the same tokens as plain
decoding in far fewer steps through the swarm, from `generate()`, the command line and the gateway, and through
a failover. Run on both ends of the transformers range: the draft runs on transformers' own Llama code, and a
release that broke it would show here as drafts that stop being right."""

from __future__ import annotations

import random
from collections.abc import Iterator

import openai
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from swarm.client import DistributedModelForCausalLM
from swarm.client.core.drafts import DEFAULT_DRAFT, load_draft_model, speculation_kwargs
from swarm.client.local_swarm import LocalSwarm, Process
from swarm.default_model import DEFAULT_MODEL_NAME, default_model_path
from tests.processors import AtStep
from tests.swarm_sim.test_cli import swarm_client
from tests.swarm_sim.test_gateway import API_KEY, start_gateway
from tests.swarm_sim.test_training import node_counter

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

PROMPT = "Once upon a time, there was a kind girl named Mia. Mia"
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def demo_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """The embedded model as 0-3 and two nodes for 4-7 (one to kill, one to go on)."""
    with LocalSwarm(tmp_path_factory.mktemp("draft")) as swarm:
        swarm.start_registry()
        swarm.chain = [swarm.start_node(default_model_path(), "0-3")]  # type: ignore[attr-defined]
        spares = [swarm.start_node(default_model_path(), "4-7") for _ in range(2)]
        swarm.wait_ready(DEFAULT_MODEL_NAME)
        for spare in spares:
            swarm.wait_online(spare)
        yield swarm


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def local() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def draft(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    return load_draft_model(DEFAULT_DRAFT, tokenizer, 6)


@pytest.fixture
def model(demo_swarm: LocalSwarm) -> Iterator[DistributedModelForCausalLM]:
    client = DistributedModelForCausalLM.from_pretrained(default_model_path(), registry=demo_swarm.registry_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def expected(local: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


class StepCounter(StoppingCriteria):
    """`generate()` asks its stopping criteria once per step, however many tokens the step settled."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_greedy_output_with_the_shipped_draft_is_plain_decodings_in_under_half_the_steps(
    model: DistributedModelForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    draft: PreTrainedModel,
    expected: list[int],
) -> None:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    counter = StepCounter()
    output = model.generate(
        ids,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([counter]),
        **speculation_kwargs(6, draft),
    )
    assert output[0].tolist() == expected
    assert counter.steps <= NEW_TOKENS // 2, f"{counter.steps} steps for {NEW_TOKENS} tokens: the draft is off"


def test_sampling_with_the_draft_draws_what_local_transformers_draws(
    model: DistributedModelForCausalLM,
    local: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    draft: PreTrainedModel,
) -> None:
    """transformers accepts a draft only where the target distribution allows it (rejection sampling), which keeps
    that distribution; the swarm runs the same algorithm on the same logits, so a seed gives the same tokens."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=0.9, assistant_model=draft)
    torch.manual_seed(5)
    wanted = local.generate(ids, **kwargs)
    torch.manual_seed(5)
    assert model.generate(ids, **kwargs).tolist() == wanted.tolist()


def test_the_command_line_drafts_with_draft_model_default(
    demo_swarm: LocalSwarm, tokenizer: PreTrainedTokenizerBase, expected: list[int]
) -> None:
    first = demo_swarm.chain[0]  # type: ignore[attr-defined]
    steps_before = node_counter(first, 'swarm_node_steps_total{kind="step"')
    result = swarm_client(
        "generate",
        PROMPT,
        "--registry",
        demo_swarm.registry_url,
        "--greedy",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--draft-model",
        "default",
    )
    assert result.returncode == 0, result.stderr
    prompt_length = len(tokenizer(PROMPT).input_ids)
    assert result.stdout.strip() == tokenizer.decode(expected[prompt_length:], skip_special_tokens=True).strip()
    assert node_counter(first, 'swarm_node_steps_total{kind="step"') - steps_before <= NEW_TOKENS // 2


def test_the_gateway_drafts_with_its_draft_model(
    demo_swarm: LocalSwarm, tokenizer: PreTrainedTokenizerBase, expected: list[int]
) -> None:
    first = demo_swarm.chain[0]  # type: ignore[attr-defined]
    gateway = start_gateway(demo_swarm, default_model_path(), "--draft-model", "default", "--speculate", "5")
    try:
        api = openai.OpenAI(base_url=f"{gateway.address}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        steps_before = node_counter(first, 'swarm_node_steps_total{kind="step"')
        reply = api.completions.create(model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
        steps = node_counter(first, 'swarm_node_steps_total{kind="step"') - steps_before
        prompt_length = len(tokenizer(PROMPT).input_ids)
        assert reply.choices[0].text == tokenizer.decode(expected[prompt_length:], skip_special_tokens=True)
        assert steps <= NEW_TOKENS // 2
        streamed = api.completions.create(
            model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == reply.choices[0].text
    finally:
        gateway.kill()


def test_kill_9_of_a_node_mid_draft_changes_nothing(
    model: DistributedModelForCausalLM,
    demo_swarm: LocalSwarm,
    tokenizer: PreTrainedTokenizerBase,
    draft: PreTrainedModel,
    expected: list[int],
) -> None:
    """The replacement replays the session's kept tokens only: drafts rolled back before the kill stay gone."""
    spares = [p for p in demo_swarm.processes if p.name.startswith("node-4-7") and p.alive()]
    killed: list[Process] = []

    def kill_the_one_in_use() -> None:
        [in_use] = [node for node in spares if node.address in model.current_chain()]
        in_use.kill()
        killed.append(in_use)

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    at = AtStep(random.Random(11).randrange(10, 30), kill_the_one_in_use)
    output = model.generate(
        ids,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        logits_processor=LogitsProcessorList([at]),
        **speculation_kwargs(6, draft),
    )
    assert killed and not killed[0].alive()
    assert output[0].tolist() == expected
