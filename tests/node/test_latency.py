"""Which peers a node measures round trips to, and what it announces of them."""

from __future__ import annotations

import asyncio

import pytest

from swarm.errors import PeerUnreachableError
from swarm.node import latency
from swarm.node.latency import MAX_NEIGHBOURS, NeighbourLatencies, could_follow, neighbours
from swarm.protocol import PeerInfo


def peer(peer_id: str, start: int, end: int, throughput: float = 100.0, state: str = "online") -> PeerInfo:
    return PeerInfo(
        peer_id=peer_id,
        address=f"ws://{peer_id}:1",
        model="m",
        num_layers=8,
        start=start,
        end=end,
        state=state,
        dtype="float32",
        throughput=throughput,
        cache_tokens_free=10,
        cache_tokens_total=10,
    )


def test_a_peer_may_follow_when_it_serves_a_layer_after_at_least_one_of_ours() -> None:
    own = peer("own", 2, 5)
    assert could_follow(own, peer("next", 5, 8))
    assert could_follow(own, peer("inside", 3, 8))  # a hop on `own` may stop at 3 or 4
    assert could_follow(own, peer("overlapping", 0, 4))
    assert not could_follow(own, peer("before", 0, 2))  # ends where we start: it comes before us
    assert not could_follow(own, peer("first layer only", 2, 3))  # our hop runs layer 2 at least
    assert not could_follow(own, peer("after a gap", 6, 8))
    assert not could_follow(own, own)
    assert not could_follow(peer("last", 4, 8), peer("next", 5, 8).model_copy(update={"num_layers": 9}))


def test_neighbours_serving_the_layer_after_our_span_come_first_and_their_number_is_bounded() -> None:
    own = peer("own", 0, 4)
    inside = peer("inside", 1, 4, throughput=10_000.0)  # may follow a hop over layer 0 only
    after = [peer(f"after{i}", 4, 8, throughput=100.0 + i) for i in range(MAX_NEIGHBOURS + 3)]
    chosen = neighbours(own, [inside, peer("joining", 4, 8, state="joining"), *after])
    assert len(chosen) == MAX_NEIGHBOURS
    assert "inside" not in {p.peer_id for p in chosen}  # faster, but a chain leaves `own` at 4 far more often
    assert [p.peer_id for p in chosen] == [f"after{i}" for i in range(MAX_NEIGHBOURS + 2, 2, -1)]  # fastest first
    assert neighbours(own, [inside])[0].peer_id == "inside"


class FakeRelays:
    """Answers pings from a table of round trips; unknown addresses are unreachable."""

    registries: list[str] = []
    credentials = None
    registry_pool = None

    def __init__(self, trips: dict[str, list[float]]) -> None:
        self.trips = trips
        self.pinged: list[str] = []

    async def round_trip(self, address: str) -> float:
        self.pinged.append(address)
        if address not in self.trips or not self.trips[address]:
            raise PeerUnreachableError(address)
        return self.trips[address].pop(0)


def test_probing_announces_medians_forgets_unlisted_peers_and_remeasures_only_stale_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own = peer("own", 0, 4)
    listed = [peer("near", 4, 8), peer("far", 4, 8), peer("gone", 4, 8)]

    async def fetch_peers(*_args: object) -> list[PeerInfo]:
        return list(listed)

    monkeypatch.setattr(latency, "fetch_peers", fetch_peers)
    relays = FakeRelays({"ws://near:1": [0.002, 0.050, 0.003], "ws://far:1": [0.080, 0.081, 0.079]})
    probe = NeighbourLatencies(relays, lambda: own, interval=30.0)  # type: ignore[arg-type]
    asyncio.run(probe.probe())
    assert probe.announced() == {"near": 3.0, "far": 80.0}  # a late pong does not make a near peer far
    assert relays.pinged.count("ws://gone:1") == 1  # unreachable: tried once, not announced

    listed.pop(1)  # "far" left the registry's listing
    relays.pinged.clear()
    asyncio.run(probe.probe())
    assert probe.announced() == {"near": 3.0}
    assert relays.pinged == ["ws://gone:1"]  # "near" was measured a moment ago

    monkeypatch.setattr(latency, "REMEASURE_SECONDS", -1.0)  # a minute later: every measurement is stale
    relays.trips["ws://near:1"] = [0.010] * 3
    asyncio.run(probe.probe())
    assert probe.announced() == {"near": 10.0}


def test_a_node_that_is_not_online_measures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fetch_peers(*_args: object) -> list[PeerInfo]:
        raise AssertionError("a joining node lists nobody")

    monkeypatch.setattr(latency, "fetch_peers", fetch_peers)
    probe = NeighbourLatencies(FakeRelays({}), lambda: peer("own", 0, 4, state="joining"), 30.0)  # type: ignore[arg-type]
    asyncio.run(probe.probe())
    assert probe.announced() == {}
