"""Speculative decoding with the draft model shipped for the embedded demo model: the same tokens as plain
decoding in far fewer steps through the swarm, from `generate()`, the command line and the gateway, and through
a failover. Run on both ends of the transformers range: the draft runs on transformers' own Llama code, and a
release that broke it would show here as drafts that stop being right."""

from __future__ import annotations

import random
from collections.abc import Iterator

import openai
import pexpect
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
from swarm.client.local_swarm import LocalSwarm, Process, child_env
from swarm.client.serve.sampling import sampling_processors
from swarm.default_model import DEFAULT_MODEL_NAME, default_model_path
from tests.processors import AtStep
from tests.swarm_sim.test_chat_score_batch import cli as chat_command
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


def test_drafting_goes_on_in_a_session_that_already_holds_a_first_turn(
    model: DistributedModelForCausalLM,
    local: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    draft: PreTrainedModel,
) -> None:
    """transformers' assisted generation hands its first step the whole sequence even when the session holds its
    start; the client trims it as plain decoding does, so a later turn drafts from where the session stands."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with model.inference_session(max_length=256) as session:
        first = model.generate(
            ids, past_key_values=session, max_new_tokens=12, do_sample=False, **speculation_kwargs(6, draft)
        )
        turn = tokenizer(" The next day,", add_special_tokens=False, return_tensors="pt").input_ids
        more = torch.cat([first, turn], dim=1)
        second = model.generate(
            more, past_key_values=session, max_new_tokens=24, do_sample=False, **speculation_kwargs(6, draft)
        )
    assert first.tolist() == local.generate(ids, max_new_tokens=12, do_sample=False).tolist()
    assert second.tolist() == local.generate(more, max_new_tokens=24, do_sample=False).tolist()


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


GATEWAY_DRAFTS = 5


@pytest.fixture(scope="module")
def gateway_api(demo_swarm: LocalSwarm) -> Iterator[openai.OpenAI]:
    gateway = start_gateway(
        demo_swarm, default_model_path(), "--draft-model", "default", "--speculate", str(GATEWAY_DRAFTS)
    )
    yield openai.OpenAI(base_url=f"{gateway.address}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    gateway.kill()


def test_the_gateway_drafts_with_its_draft_model(
    demo_swarm: LocalSwarm, gateway_api: openai.OpenAI, tokenizer: PreTrainedTokenizerBase, expected: list[int]
) -> None:
    first = demo_swarm.chain[0]  # type: ignore[attr-defined]
    steps_before = node_counter(first, 'swarm_node_steps_total{kind="step"')
    reply = gateway_api.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0
    )
    steps = node_counter(first, 'swarm_node_steps_total{kind="step"') - steps_before
    prompt_length = len(tokenizer(PROMPT).input_ids)
    assert reply.choices[0].text == tokenizer.decode(expected[prompt_length:], skip_special_tokens=True)
    assert steps <= NEW_TOKENS // 2
    streamed = gateway_api.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == reply.choices[0].text


def test_the_gateway_drafts_for_sampled_requests_and_draws_what_local_transformers_draws(
    demo_swarm: LocalSwarm, gateway_api: openai.OpenAI, local: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """A drafted token is kept only where the request's own seeded sampler, run on the swarm's logits at that
    position, drew it: the output keeps the sampled distribution, and local transformers with the same draft and
    sampler draws the same tokens."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    wanted = local.generate(
        ids,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        logits_processor=LogitsProcessorList(sampling_processors(0.8, seed=7)),
        assistant_model=load_draft_model(DEFAULT_DRAFT, tokenizer, GATEWAY_DRAFTS),
    )[0, ids.shape[1] :]
    first = demo_swarm.chain[0]  # type: ignore[attr-defined]
    steps_before = node_counter(first, 'swarm_node_steps_total{kind="step"')
    reply = gateway_api.completions.create(
        model=DEFAULT_MODEL_NAME, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0.8, seed=7
    )
    steps = node_counter(first, 'swarm_node_steps_total{kind="step"') - steps_before
    assert reply.choices[0].text == tokenizer.decode(wanted, skip_special_tokens=True)
    assert steps <= NEW_TOKENS // 2, f"{steps} steps for {NEW_TOKENS} sampled tokens: the draft is off"


def chat_transcript(swarm: LocalSwarm, *flags: str) -> tuple[str, float]:
    """Two greedy turns of `swarm-client chat` with `flags`: what it printed, and the steps its first node took."""
    first = swarm.chain[0]  # type: ignore[attr-defined]
    steps_before = node_counter(first, 'swarm_node_steps_total{kind="step"')
    command = [*chat_command(swarm, default_model_path(), "chat"), "--temperature", "0", "--max-new-tokens", "48"]
    chat = pexpect.spawn(command[0], [*command[1:], *flags], env=child_env(), encoding="utf-8", timeout=120)
    printed = []
    try:
        chat.expect_exact("you> ")
        for line in ("Tell me a story about a girl named Mia.", "What did Mia do next?"):
            chat.sendline(line)
            chat.expect_exact("you> ")
            printed.append(chat.before.replace("\r\n", "\n"))
        chat.sendline("/quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    return "".join(printed), node_counter(first, 'swarm_node_steps_total{kind="step"') - steps_before


def test_chat_drafts_with_draft_model_default_and_says_the_same(demo_swarm: LocalSwarm) -> None:
    """The second turn starts from a session that holds the first: drafting must go on from there (transformers'
    assisted generation alone would send the whole conversation again)."""
    plain, plain_steps = chat_transcript(demo_swarm)
    drafted, drafted_steps = chat_transcript(demo_swarm, "--draft-model", "default")
    assert drafted == plain
    assert drafted_steps <= plain_steps * 2 / 3, f"{drafted_steps} steps with drafts, {plain_steps} without"


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
