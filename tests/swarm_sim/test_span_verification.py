"""Span verification against a lying node: it is caught, banned, reported, and the text stays exact.

Layers 0-7 of tiny-llama are served by a liar (`lying_node.py`, which also claims to be the fastest peer, so
the client tries it first), by an honest full-span node, and by two honest half-span nodes (the tie-breaker).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList, PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.core.scheduler import DecodeScheduler
from swarm.client.local_swarm import LocalSwarm, Process
from swarm.protocol import PeerInfo
from swarm.registry.client import fetch_peers
from swarm.transport import Credentials
from tests.checkpoints import copy_tokenizer, save_checkpoint, tiny_llama_config
from tests.processors import AtStep

PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7]])
NEW_TOKENS = 12
LIAR = [sys.executable, str(Path(__file__).with_name("lying_node.py"))]


@pytest.fixture(scope="module")
def expected(local_llama: PreTrainedModel) -> list[list[int]]:
    return local_llama.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


NAME = "verified"


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """The honest peers; each test adds a liar (a new client's first choice) and stops it when done."""
    with LocalSwarm(tmp_path_factory.mktemp("verification")) as swarm:
        swarm.start_registry("--reports-to-exclude", "1")  # every client here has the same address
        honest = [swarm.start_node(tiny_llama, layers, "--model-name", NAME) for layers in ("0-7", "0-3", "4-7")]
        for node in honest:
            swarm.wait_online(node)
        yield swarm


def lying(swarm: LocalSwarm, tiny_llama: Path, lie: str) -> Process:
    liar = swarm.start_node(tiny_llama, "0-7", "--model-name", NAME, name=f"liar-{lie}", program=LIAR, env={"LIE": lie})
    swarm.wait_online(liar)
    return liar


def client(tiny_llama: Path, swarm: LocalSwarm, **kwargs: object) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        tiny_llama, registry=swarm.registry_url, model_name=NAME, **kwargs
    )


def listed(swarm: LocalSwarm) -> list[PeerInfo]:
    return asyncio.run(fetch_peers([swarm.registry_url], NAME, Credentials()))


def reported(swarm: LocalSwarm, liar: Process, timeout: float = 10.0) -> bool:
    """The registry leaves `liar` out of what it lists (the report travels in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(peer.address != liar.address for peer in listed(swarm)):
            return True
        time.sleep(0.2)
    return False


def generate(model: DistributedModelForCausalLM) -> list[list[int]]:
    return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


@pytest.mark.parametrize("lie", ["noise", "constant"])
def test_a_peer_that_perturbs_every_answer_is_caught_on_its_first_step_and_the_text_is_exact(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]], lie: str
) -> None:
    liar = lying(swarm, tiny_llama, lie)
    model = client(tiny_llama, swarm)
    liar_id = next(peer.peer_id for peer in listed(swarm) if peer.address == liar.address)
    try:
        assert generate(model) == expected
        assert model.verifier.caught == 1
        assert liar_id in model.planner.banned()
        assert liar.address not in model.current_chain()
        assert generate(model) == expected  # and it is not asked again
        assert model.verifier.caught == 1
        assert reported(swarm, liar)  # the registry stopped listing it
    finally:
        model.close()
        liar.kill()


def test_a_peer_that_lies_once_in_a_while_is_caught_when_that_step_is_checked(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    """Every 5th answer is wrong; checking every step catches the first wrong one, and the text is exact."""
    liar = lying(swarm, tiny_llama, "every:5")
    model = client(tiny_llama, swarm, verify_rate=1.0)
    try:
        assert generate(model) == expected
        assert model.verifier.caught == 1
        assert liar.address not in model.current_chain()
    finally:
        model.close()
        liar.kill()


@pytest.mark.parametrize("lie", ["nan", "narrow"])
def test_a_peer_that_answers_what_cannot_be_right_loses_its_link_at_once_without_verification(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]], lie: str
) -> None:
    """NaN, or hidden states of the wrong size: banned and failed over on the spot, not raised to the caller."""
    liar = lying(swarm, tiny_llama, lie)
    model = client(tiny_llama, swarm, verify_rate=0.0)
    try:
        assert generate(model) == expected
        assert model.verifier.checks == 0
        assert liar.address not in model.current_chain()
    finally:
        model.close()
        liar.kill()


def test_a_node_serving_other_weights_under_the_same_name_is_never_used(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]], tmp_path: Path
) -> None:
    """Same architecture, other weights (another seed): the registry lists it under the name, it claims to be
    the fastest peer, and it answers honestly for its weights; the client still never sends it a step."""
    (tmp_path / "other").mkdir()
    other = save_checkpoint(tiny_llama_config(copy_tokenizer(tmp_path / "other")), tmp_path / "other", seed=1)
    impostor = swarm.start_node(other, "0-7", "--model-name", NAME, name="impostor", program=LIAR, env={"LIE": "none"})
    swarm.wait_online(impostor)
    model = client(tiny_llama, swarm, verify_rate=0.0)
    try:
        assert impostor.address not in [peer.address for peer in model.runner.run(model.planner.usable_peers())]
        assert generate(model) == expected
    finally:
        model.close()
        impostor.kill()


def test_steps_sent_together_by_the_scheduler_are_checked_and_a_liar_among_them_is_caught(
    tiny_llama: Path, swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    """Concurrent jobs' decode steps travel as one frame per peer (`grouped_steps`); checking samples each one."""
    prompts = [PROMPT, torch.tensor([[1, 300, 8, 99, 14, 33, 7, 45]])]
    wanted = [local_llama.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() for p in prompts]
    liar = lying(swarm, tiny_llama, "every:7")
    model = client(tiny_llama, swarm, verify_rate=1.0)
    scheduler = DecodeScheduler(model, lanes=1)  # one lane: the jobs' steps go together
    try:
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(scheduler.generate, p, max_new_tokens=NEW_TOKENS) for p in prompts]
            assert [job.result(timeout=120).tolist() for job in jobs] == wanted
        assert model.verifier.caught >= 1  # each job whose session was on the liar may catch it in the same tick
        assert reported(swarm, liar)
    finally:
        scheduler.close()
        model.close()
        liar.kill()


def test_a_peer_that_claims_speed_but_answers_slowly_is_left_once_timed(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    """Its announced throughput wins the first chain; the client times its steps (compute beyond the measured
    round trip) and plans the next chain by that instead."""
    slow = lying(swarm, tiny_llama, "slow:0.2")
    model = client(tiny_llama, swarm, verify_rate=0.0)
    try:
        chains: list[list[str]] = []
        for _ in range(2):
            output = model.generate(
                PROMPT,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                logits_processor=LogitsProcessorList([AtStep(2, lambda: chains.append(model.current_chain()))]),
            )
            assert output.tolist() == expected
        [slow_peer] = [peer for peer in listed(swarm) if peer.address == slow.address]
        assert model.planner.layer_seconds[slow_peer.peer_id] > 0.1 / 8  # about 0.2 s over its 8 layers
    finally:
        model.close()
        slow.kill()
    assert chains[0] == [slow.address]
    assert slow.address not in chains[1]
