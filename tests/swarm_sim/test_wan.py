"""Across a simulated home internet (60 ms round trips, 50 Mbit/s, 0.5 % loss) the output stays exact, also when
a node is killed mid-generation."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm, Process
from swarm.client.wan import PROFILES
from swarm.registry.client import fetch_peers
from swarm.transport import Credentials
from tests.processors import AtStep

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7, 99, 14, 300, 8]])
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def home_swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """tiny-llama as 0-3 plus three nodes for 4-7 (one to kill in each way of stepping, one to go on), each behind a
    `home` link of its own, as is the registry."""
    with LocalSwarm(tmp_path_factory.mktemp("wan"), wan="home") as swarm:
        swarm.start_registry()
        swarm.start_node(tiny_llama, "0-3")
        spares = [swarm.start_node(tiny_llama, "4-7") for _ in range(3)]
        swarm.wait_ready("tiny-llama")
        for spare in spares:
            swarm.wait_online(spare)
        yield swarm


@pytest.fixture(scope="module")
def expected(local_llama: PreTrainedModel) -> list[list[int]]:
    return local_llama.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


def generate(model: DistributedModelForCausalLM, *processors: LogitsProcessor) -> list[list[int]]:
    return model.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, logits_processor=LogitsProcessorList(processors)
    ).tolist()


def test_greedy_generation_across_home_links_equals_local_transformers(
    tiny_llama: Path, home_swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    assert home_swarm.registry_url == home_swarm.proxies["registry"].address()
    sent_before = {name: proxy.bytes_up for name, proxy in home_swarm.proxies.items()}
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=home_swarm.registry_url)
    chain: list[str] = []
    try:
        output = generate(model, AtStep(2, lambda: chain.extend(model.current_chain())))
    finally:
        model.close()
    assert output == expected
    behind_proxies = {process.name: process.address for process in home_swarm.processes}
    assert len(chain) == 2 and set(chain) <= set(behind_proxies.values())  # the nodes announced their proxies
    assert all(proxy.profile == PROFILES["home"] for proxy in home_swarm.proxies.values())
    for name, address in behind_proxies.items():
        if address in chain or name == "registry":
            assert home_swarm.proxies[name].bytes_up > sent_before[name]  # the traffic crossed the WAN


@pytest.mark.parametrize("forwarding", [True, False], ids=["forwarded", "client-in-the-middle"])
def test_kill_9_of_a_redundant_node_mid_generation_under_home_links_changes_nothing(
    tiny_llama: Path, home_swarm: LocalSwarm, expected: list[list[int]], forwarding: bool
) -> None:
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, registry=home_swarm.registry_url, forwarding=forwarding
    )
    spares = [p for p in home_swarm.processes if p.name.startswith("node-4-7") and p.alive()]
    killed: list[Process] = []

    def kill_the_one_in_use() -> None:
        [in_use] = [node for node in spares if node.address in model.current_chain()]
        in_use.kill()
        killed.append(in_use)

    try:
        output = generate(model, AtStep(random.Random(7).randrange(4, NEW_TOKENS - 4), kill_the_one_in_use))
    finally:
        model.close()
    assert killed and not killed[0].alive()
    assert output == expected


def test_chains_move_to_a_nearer_peer_once_round_trips_are_measured(
    tiny_llama: Path, home_swarm: LocalSwarm, expected: list[list[int]]
) -> None:
    """A peer over a `home` link serves every layer; then a peer over a `lan` link joins. The client measures each
    round trip as it connects, route costs use them, so its next chains go to the near peer, which it did not
    know, rather than the far one that served it well."""
    far = home_swarm.start_node(tiny_llama, "0-7", "--model-name", "near-or-far", wan="home")
    home_swarm.wait_online(far)
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, registry=home_swarm.registry_url, model_name="near-or-far"
    )
    chains: list[list[str]] = []

    def generate_noting_the_chain() -> None:
        assert generate(model, AtStep(1, lambda: chains.append(model.current_chain()))) == expected

    try:
        generate_noting_the_chain()
        near = home_swarm.start_node(tiny_llama, "0-7", "--model-name", "near-or-far", wan="lan")
        home_swarm.wait_online(near)
        generate_noting_the_chain()
        generate_noting_the_chain()
        round_trips = sorted(model.planner.round_trips.values())
    finally:
        model.close()
    assert chains == [[far.address], [near.address], [near.address]]
    assert len(round_trips) == 2 and round_trips[1] >= PROFILES["home"].rtt > 5 * round_trips[0]


def test_nodes_announce_their_measured_round_trips_to_the_peers_that_may_follow_them(home_swarm: LocalSwarm) -> None:
    """A forwarded step waits on the trip between two nodes, which no client can measure: the 0-3 node pings the
    4-7 nodes (each behind its own `home` link) and announces the round trips for clients to plan with."""
    first = next(process for process in home_swarm.processes if process.name.startswith("node-0-3"))
    following = [p for p in home_swarm.processes if p.name.startswith("node-4-7") and p.alive()]
    deadline = time.monotonic() + 45
    while True:
        by_address = {
            peer.address: peer
            for peer in asyncio.run(fetch_peers([home_swarm.registry_url], "tiny-llama", Credentials()))
        }
        announced = by_address[first.address].latencies_ms
        wanted = {by_address[p.address].peer_id for p in following if p.address in by_address}
        if (len(wanted) == len(following) and wanted <= set(announced)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(wanted) == len(following) >= 1 and wanted <= set(announced), announced
    home = PROFILES["home"]
    for peer_id in wanted:
        assert home.rtt_ms * 0.95 <= announced[peer_id] < home.rtt_ms + 200, announced
    assert all(by_address[p.address].latencies_ms == {} for p in following)  # nobody can follow the last layer
