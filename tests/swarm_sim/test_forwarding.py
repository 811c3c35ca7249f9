"""Node-to-node forwarding and speculative decoding through a real swarm: output equal to local `generate`, nodes
that only forward to listed peers and only step sessions whose key they are shown, rolled-back drafts."""

from __future__ import annotations

import asyncio
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm, Process
from swarm.protocol import (
    OpenSession,
    RelayHop,
    SessionOpened,
    Step,
    StepResult,
    WireTensor,
    decode_message,
    encode_message,
)
from swarm.registry.client import fetch_peers
from swarm.transport import Credentials, open_connection, request
from tests.swarm_sim.test_gateway import API_KEY, local_text, start_gateway
from tests.swarm_sim.test_training import node_counter

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7, 45, 67, 89, 120, 33]])  # repeats: drafts that hit
HIDDEN = 64


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("forwarding")) as local:
        local.start_registry()
        local.chain = [local.start_node(tiny_llama, layers) for layers in ("0-2", "3-5", "6-7")]  # type: ignore[attr-defined]
        local.wait_ready("tiny-llama")
        yield local


@pytest.fixture
def model(tiny_llama: Path, swarm: LocalSwarm) -> Iterator[DistributedModelForCausalLM]:
    client = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url)
    yield client
    client.close()


def relays(node: Process, outcome: str) -> float:
    text = urllib.request.urlopen(node.address.replace("ws://", "http://") + "/metrics", timeout=10).read().decode()
    prefix = f'swarm_node_relays_total{{outcome="{outcome}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_forwarded_steps_equal_local_generate_and_go_node_to_node(
    model: DistributedModelForCausalLM, swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    chain: list[Process] = swarm.chain  # type: ignore[attr-defined]
    before = [relays(node, "sent") for node in chain]
    batch = torch.tensor([[0, 0, 1, 45, 67, 89], [1, 300, 12, 99, 4, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert model.generate(batch, **kwargs).tolist() == local_llama.generate(batch, **kwargs).tolist()
    sent = [relays(node, "sent") - was for node, was in zip(chain, before, strict=True)]
    assert sent[0] >= 12 and sent[1] >= 12 and sent[2] == 0  # the last link answers the client only
    assert all(relays(node, "failed") == 0 for node in chain)


def test_a_forwarded_step_times_the_compute_of_its_first_link_at_least(
    model: DistributedModelForCausalLM, swarm: LocalSwarm
) -> None:
    """The first link's answer comes a round trip plus its compute after the step left; later links are timed
    from the answer before theirs once their junction was measured. Route planning believes these times over
    announced throughput."""
    chain: list[Process] = swarm.chain  # type: ignore[attr-defined]
    model.generate(PROMPT, max_new_tokens=12, do_sample=False)  # 11 one-token steps: some outlast the fastest
    ids = {peer.address: peer.peer_id for peer in asyncio.run(fetch_peers([swarm.registry_url], None, Credentials()))}
    assert ids[chain[0].address] in model.planner.layer_seconds
    assert set(model.planner.layer_seconds) <= {ids[node.address] for node in chain}
    assert all(0.0 <= seconds < 0.5 for seconds in model.planner.layer_seconds.values())


def test_with_forwarding_off_every_step_goes_through_the_client(
    model: DistributedModelForCausalLM, swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    chain: list[Process] = swarm.chain  # type: ignore[attr-defined]
    model.planner.forwarding = False
    before = relays(chain[0], "sent")
    output = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert output.tolist() == local_llama.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()
    assert relays(chain[0], "sent") == before


def test_speculative_greedy_generation_equals_plain_generation(
    model: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    """Prompt-lookup drafts are checked by the swarm in one step; the rejected ones are rolled back on every node
    (`Step.lengths`), so the output is plain greedy decoding's."""
    expected = local_llama.generate(PROMPT, max_new_tokens=30, do_sample=False)
    got = model.generate(PROMPT, max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=6)
    assert got.tolist() == expected.tolist()


def test_speculative_sampling_draws_what_transformers_draws(
    model: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    """With sampling, transformers accepts a draft only where the target distribution's own draw agrees, which
    keeps that distribution exactly; the swarm runs the same algorithm on the same logits, so with the same seed
    it draws the same tokens as local transformers."""
    kwargs = dict(max_new_tokens=20, do_sample=True, temperature=0.9, prompt_lookup_num_tokens=4)
    torch.manual_seed(3)
    expected = local_llama.generate(PROMPT, **kwargs)
    torch.manual_seed(3)
    got = model.generate(PROMPT, **kwargs)
    assert got.tolist() == expected.tolist()


async def _open(address: str, start: int, end: int, key: str | None) -> tuple[object, str]:
    connection, _ = await open_connection(address, Credentials(), agent="test")
    session_id = secrets.token_hex(4)
    message = OpenSession(session_id=session_id, start=start, end=end, max_length=32, batch_size=1, relay_key=key)
    assert isinstance(await request(connection, message, SessionOpened, timeout=10), SessionOpened)
    return connection, session_id


def _step(session_id: str, **extra: object) -> Step:
    return Step(
        step_id=7,
        session_ids=[session_id],
        rows=[1],
        hidden=WireTensor.from_torch(torch.randn(1, 2, HIDDEN)),
        position_ids=WireTensor.from_torch(torch.arange(2)[None]),
        **extra,
    )


def test_a_node_forwards_only_to_peers_the_registry_lists(swarm: LocalSwarm) -> None:
    chain: list[Process] = swarm.chain  # type: ignore[attr-defined]

    async def scenario() -> StepResult:
        connection, session_id = await _open(chain[0].address, 0, 3, None)
        async with connection:  # type: ignore[attr-defined]
            hop = RelayHop(address="ws://127.0.0.1:9", session_id="x", relay_key="a" * 32, step_id=0)
            return await request(connection, _step(session_id, relay=[hop]), StepResult, timeout=30)  # type: ignore[arg-type]

    result = asyncio.run(scenario())
    assert result.relay_error is not None and result.relay_error.code == "bad_request"
    assert "not a peer the registries list" in result.relay_error.message
    assert result.hidden.shape == [1, 2, HIDDEN]  # the node's own step went through


def test_a_relayed_step_needs_the_sessions_key(swarm: LocalSwarm) -> None:
    """Another connection may step a session only with the key it was opened with; a wrong key is refused to the
    sender as an unknown session, and the session is as it was."""
    chain: list[Process] = swarm.chain  # type: ignore[attr-defined]
    key = secrets.token_hex(16)

    async def scenario() -> tuple[StepResult, StepResult]:
        owner, session_id = await _open(chain[1].address, 3, 6, key)
        stranger, _ = await open_connection(chain[1].address, Credentials(), agent="test")
        async with owner, stranger:  # type: ignore[attr-defined]
            await stranger.send(encode_message(_step(session_id, relay_key=secrets.token_hex(16))))
            refused = decode_message(await asyncio.wait_for(stranger.recv(), 10))
            stepped = await request(owner, _step(session_id), StepResult, timeout=30)  # type: ignore[arg-type]
            return refused, stepped  # type: ignore[return-value]

    refused, stepped = asyncio.run(scenario())
    assert refused.type == "step_result" and refused.errors is not None
    assert refused.errors[0] is not None and refused.errors[0].code == "unknown_session"
    assert stepped.errors is None  # positions 0-1 again: the refused step changed nothing


def test_the_gateway_speculates_for_greedy_requests_with_the_same_text(
    tiny_llama: Path, swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    chain: list[Process] = swarm.chain  # type: ignore[attr-defined]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    gateway = start_gateway(swarm, tiny_llama, "--speculate", "6")
    try:
        api = openai.OpenAI(base_url=f"{gateway.address}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        prompt = tokenizer.decode(PROMPT[0], skip_special_tokens=True)
        ids = tokenizer(prompt).input_ids
        before = sum(node_counter(node, "swarm_node_rolled_back_tokens_total") for node in chain)
        reply = api.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0)
        assert reply.choices[0].text == local_text(local_llama, tokenizer, ids, 24)
        assert sum(node_counter(node, "swarm_node_rolled_back_tokens_total") for node in chain) > before
        streamed = api.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == reply.choices[0].text
    finally:
        gateway.kill()
