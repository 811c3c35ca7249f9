"""Peers come and go mid-generation: the output stays exactly what an undisturbed run gives."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList, PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm, Process, wait_for_port
from swarm.errors import SwarmFullError
from tests.processors import AtStep

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7, 99, 14, 300, 8]])
NEW_TOKENS = 100


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("failover")) as local:
        local.start_registry()
        yield local


@pytest.fixture(scope="module")
def expected(local_llama: PreTrainedModel) -> list[list[int]]:
    return local_llama.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


def client(tiny_llama: Path, swarm: LocalSwarm, name: str, **kwargs: object) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        tiny_llama, registry=swarm.registry_url, model_name=name, **kwargs
    )


def serving(nodes: list[Process], model: DistributedModelForCausalLM) -> Process:
    in_use = set(model.current_chain())
    [node] = [node for node in nodes if node.address in in_use]
    return node


def redundant_swarm(
    tiny_llama: Path, swarm: LocalSwarm, name: str
) -> tuple[list[Process], DistributedModelForCausalLM]:
    """`name` served as 0-3 plus two online nodes for 4-7 (returned), and a client of it."""
    swarm.start_node(tiny_llama, "0-3", "--model-name", name)
    spares = [swarm.start_node(tiny_llama, "4-7", "--model-name", name) for _ in range(2)]
    swarm.wait_ready(name)
    for spare in spares:
        swarm.wait_online(spare)
    return spares, client(tiny_llama, swarm, name)


def generate_with(model: DistributedModelForCausalLM, step: int, action: Callable[[], None]) -> list[list[int]]:
    processors = LogitsProcessorList([AtStep(step, action)])
    return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, logits_processor=processors).tolist()


def test_kill_9_of_a_redundant_node_mid_generation_changes_nothing(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    name = "fo-redundant"
    spares, model = redundant_swarm(tiny_llama, swarm, name)
    killed: list[Process] = []

    def kill_the_one_in_use() -> None:
        killed.append(serving(spares, model))
        killed[0].kill()

    try:
        step = random.Random(7).randrange(5, NEW_TOKENS - 5)
        output = generate_with(model, step, kill_the_one_in_use)
    finally:
        model.close()
    assert killed and not killed[0].alive()
    assert output == expected


def test_a_lost_span_can_be_covered_by_two_smaller_nodes(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    name = "fo-split"
    swarm.start_node(tiny_llama, "0-3", "--model-name", name)
    whole = swarm.start_node(tiny_llama, "4-7", "--model-name", name)
    swarm.wait_ready(name)
    for layers in ("4-5", "6-7"):
        swarm.wait_online(swarm.start_node(tiny_llama, layers, "--model-name", name))
    model = client(tiny_llama, swarm, name)
    chains: list[list[str]] = []
    try:
        output = generate_with(model, 30, lambda: (chains.append(model.current_chain()), whole.kill()))
    finally:
        model.close()
    assert whole.address in chains[0] and len(chains[0]) == 2
    assert output == expected


def test_the_only_node_of_a_span_may_restart_within_the_wait(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    name = "fo-restart"
    swarm.start_node(tiny_llama, "0-3", "--model-name", name)
    only = swarm.start_node(tiny_llama, "4-7", "--model-name", name)
    swarm.wait_ready(name)
    model = client(tiny_llama, swarm, name, failover_wait=90.0)

    def kill_and_restart_later() -> None:
        only.kill()
        threading.Timer(2.0, lambda: swarm.restart(only)).start()

    try:
        output = generate_with(model, 40, kill_and_restart_later)
    finally:
        model.close()
    assert output == expected


def test_generation_goes_on_while_the_registry_restarts(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    name = "fo-registry"
    swarm.start_node(tiny_llama, "0-3", "--model-name", name)
    swarm.start_node(tiny_llama, "4-7", "--model-name", name)
    swarm.wait_ready(name)
    registry = swarm.processes[0]
    model = client(tiny_llama, swarm, name)
    try:
        output = generate_with(model, 20, registry.kill)
    finally:
        model.close()
    assert output == expected
    restarted = swarm.restart(registry)
    swarm.processes.remove(restarted)
    swarm.processes.insert(0, restarted)
    wait_for_port(swarm.registry_port, restarted)
    swarm.wait_ready(name, timeout=30)  # nodes re-announce to the new registry
    fresh = client(tiny_llama, swarm, name)
    try:
        assert fresh.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == expected
    finally:
        fresh.close()


def test_sigterm_drains_a_node_and_clients_move_without_an_error(
    tiny_llama: Path, swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    name = "fo-drain"
    pair, model = redundant_swarm(tiny_llama, swarm, name)
    drained: list[Process] = []

    def drain() -> None:
        drained.append(serving(pair, model))
        drained[0].signal(signal.SIGTERM)

    try:
        output = generate_with(model, 25, drain)
    finally:
        model.close()
    assert output == expected
    assert drained[0].popen.wait(timeout=30) == 0
    assert "draining" in drained[0].log()


def test_a_full_node_sends_new_clients_elsewhere_and_then_says_the_swarm_is_full(
    tiny_llama: Path, swarm: LocalSwarm
) -> None:
    name = "fo-budget"
    session_tokens = PROMPT.shape[1] + 20
    nodes = [
        swarm.start_node(tiny_llama, "0-7", "--model-name", name, "--cache-tokens", str(session_tokens))
        for _ in range(2)
    ]
    for node in nodes:
        swarm.wait_online(node)
    models = [client(tiny_llama, swarm, name) for _ in range(3)]
    try:
        sessions = [m.inference_session(max_length=session_tokens) for m in models]
        first, second = (s.__enter__() for s in sessions[:2])
        models[0].generate(PROMPT, max_new_tokens=4, do_sample=False, past_key_values=first)
        models[1].generate(PROMPT, max_new_tokens=4, do_sample=False, past_key_values=second)
        assert first.session.links[0].link.peer.peer_id != second.session.links[0].link.peer.peer_id
        third = sessions[2].__enter__()
        with pytest.raises(SwarmFullError, match="the swarm is full"):
            models[2].generate(PROMPT, max_new_tokens=4, do_sample=False, past_key_values=third)
        for session in sessions:
            session.__exit__(None, None, None)
    finally:
        for model in models:
            model.close()


def test_nodes_announce_to_every_registry_and_clients_use_any_live_one(
    tiny_llama: Path, tmp_path: Path, expected: list[list[int]]
) -> None:
    with LocalSwarm(tmp_path) as local:
        first = local.start_registry()
        second = local.start_registry(port=local.new_port())
        both = f"{first.address},{second.address}"
        for layers in ("0-3", "4-7"):
            local.start_node(tiny_llama, layers, "--registry", both)
        local.wait_ready("tiny-llama")
        first.kill()
        model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=both)
        try:
            output = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
        finally:
            model.close()
    assert output == expected
