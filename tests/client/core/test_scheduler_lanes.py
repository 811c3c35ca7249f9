"""A second decoding lane only where the client and its peers can work at the same time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from swarm.client import DistributedModelForCausalLM
from swarm.client.core import scheduler as scheduler_module
from swarm.client.core.channel import ChannelPool
from swarm.client.core.scheduler import DecodeScheduler, shares_cores

LOCAL_PEERS = ["ws://127.0.0.1:4001", "ws://127.0.0.1:4002"]


def test_peers_on_this_machine_share_its_cores_when_there_are_fewer_cores_than_processes() -> None:
    assert shares_cores(LOCAL_PEERS, cores=2)  # the client and two nodes on two cores
    assert shares_cores(["ws://localhost:4001", "wss://[::1]:4002"], cores=2)
    assert not shares_cores(LOCAL_PEERS, cores=3)  # a core for each of them
    assert shares_cores(LOCAL_PEERS, cores=None)  # unknown: as if one


def test_a_peer_on_another_machine_or_no_peer_yet_means_no_sharing() -> None:
    assert not shares_cores([*LOCAL_PEERS, "ws://203.0.113.7:4003"], cores=1)
    assert not shares_cores(["ws://node.example.org:4001"], cores=1)
    assert not shares_cores([], cores=1)


@pytest.mark.parametrize(
    ("addresses", "cores", "lanes", "open_lanes"),
    [
        (LOCAL_PEERS, 2, None, 1),  # crowded: new jobs go to the first lane
        (LOCAL_PEERS, 8, None, 2),
        (["ws://203.0.113.7:4003"], 1, None, 2),
        (LOCAL_PEERS, 2, 3, 3),  # a fixed number of lanes is used whole
    ],
)
def test_new_jobs_go_to_the_lanes_the_cores_allow(
    tiny_llama: Path,
    monkeypatch: pytest.MonkeyPatch,
    addresses: list[str],
    cores: int,
    lanes: int | None,
    open_lanes: int,
) -> None:
    channels = [SimpleNamespace(address=address) for address in addresses]
    monkeypatch.setattr(ChannelPool, "channels", property(lambda pool: channels))
    monkeypatch.setattr(scheduler_module.os, "cpu_count", lambda: cores)
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry="ws://127.0.0.1:9")  # never reached
    scheduler = DecodeScheduler(model, lanes=lanes)
    try:
        assert scheduler.open_lanes == open_lanes
    finally:
        scheduler.close()
        model.close()
