"""The gateway (`swarm-client serve`, a real process) in front of a swarm that fails under it: a stream carries on,
token for token, when the node serving it is killed; a request too big for a node's batch is refused before
any node sees it; and when a node does refuse something, its address never reaches the client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from swarm.client.local_swarm import LocalSwarm, Process
from tests.swarm_sim.test_gateway import API_KEY, local_continuation, node_metric, post, start_gateway

NAME = "tiny-hardening"
NODE_BATCH = 8
"""Every node takes at most this many sequences of a session: below the gateway's default (64), so a request
in between passes the gateway and is refused by a node."""
STEPS = 'swarm_node_steps_total{kind="step"}'


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """tiny-llama as 0-3 plus two nodes for 4-7, each taking at most `NODE_BATCH` rows."""
    limit = ("--model-name", NAME, "--max-batch-size", str(NODE_BATCH))
    with LocalSwarm(tmp_path_factory.mktemp("hardening")) as local:
        local.start_registry()
        local.start_node(tiny_llama, "0-3", *limit)
        spares = [local.start_node(tiny_llama, "4-7", *limit) for _ in range(2)]
        local.wait_ready(NAME)
        for spare in spares:
            local.wait_online(spare)
        yield local


@pytest.fixture(scope="module")
def gateway(tiny_llama: Path, swarm: LocalSwarm) -> str:
    # no spot checks by other peers: the node serving a stream is then the only one holding a session
    return start_gateway(swarm, tiny_llama, "--model-name", NAME, "--verify-rate", "0").address


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llama)


def second_half(swarm: LocalSwarm) -> list[Process]:
    """The nodes serving layers 4-7 that are alive."""
    return [process for process in swarm.processes if process.name.startswith("node-4-7") and process.alive()]


def test_a_stream_carries_on_token_exact_when_the_node_serving_it_is_killed(
    gateway: str, swarm: LocalSwarm, tokenizer: PreTrainedTokenizerBase, local_llama: PreTrainedModel
) -> None:
    prompt, max_tokens = "Once", 200
    expected = local_continuation(local_llama, tokenizer(prompt).input_ids, max_tokens)
    assert len(expected) == max_tokens, "needs a generation that outlasts the kill"
    api = openai.OpenAI(base_url=f"{gateway}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    stream = api.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    texts: list[str] = []
    killed: Process | None = None
    deadline = time.monotonic() + 120
    for chunk in stream:
        assert time.monotonic() < deadline, "the stream stalled"
        texts += [choice.text for choice in chunk.choices]
        if killed is None and len(texts) == 3:
            [killed] = [node for node in second_half(swarm) if node_metric(node.address, "swarm_node_sessions")]
            [survivor] = [node for node in second_half(swarm) if node is not killed]
            survivor_steps = node_metric(survivor.address, STEPS)
            killed.kill()
    assert killed is not None and second_half(swarm) == [survivor]
    assert node_metric(survivor.address, STEPS) > survivor_steps + max_tokens / 2, "the rest came from the survivor"
    assert "".join(texts) == tokenizer.decode(expected, skip_special_tokens=True)


def test_more_sequences_than_the_gateway_batches_are_refused_before_any_node_sees_them(
    gateway: str, swarm: LocalSwarm
) -> None:
    """5 prompts x best_of 16 is 80 rows, over the gateway's --max-batch-rows (64, a node's default batch)."""
    steps = [node_metric(node.address, STEPS) for node in second_half(swarm)]
    status, body = post(f"{gateway}/v1/completions", {"prompt": ["a"] * 5, "n": 1, "best_of": 16, "max_tokens": 2})
    assert status == 400 and "80 sequences" in body["error"]["message"], body
    assert body["error"]["param"] == "best_of"
    assert [node_metric(node.address, STEPS) for node in second_half(swarm)] == steps


def test_a_node_refusing_a_request_is_reported_without_any_peer_address(gateway: str, swarm: LocalSwarm) -> None:
    """10 rows pass the gateway but not the nodes (`NODE_BATCH`): the client hears why, not where."""
    status, body = post(f"{gateway}/v1/completions", {"prompt": ["a"] * 5, "n": 2, "max_tokens": 2})
    assert status == 502 and f"limit of {NODE_BATCH}" in body["error"]["message"], body
    text = str(body)
    assert "ws://" not in text and "127.0.0.1" not in text
    assert not any(node.address.rsplit(":", 1)[1] in text for node in swarm.processes if node.address)
    status, body = post(f"{gateway}/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert status == 200, body
