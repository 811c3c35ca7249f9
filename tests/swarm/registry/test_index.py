"""Route queries from the registry's per-layer index: a few candidates per layer, kept current as peers announce,
change, expire and leave, the same on every registry; and expiry from a heap that never drops a peer whose
heartbeats keep coming."""

from __future__ import annotations

import random

from swarm.protocol import PeerInfo
from swarm.registry.state import RegistryState
from swarm.routing import DEFAULT_HOP_SECONDS, SHORT_CACHE_PENALTY_SECONDS, layer_seconds, plan_route
from tests.swarm.test_routing import peer

LAYERS = 32


def random_swarm(count: int, seed: int = 0) -> list[PeerInfo]:
    rng = random.Random(seed)
    peers = []
    for index in range(count):
        length = rng.randint(1, LAYERS // 4)
        start = rng.randrange(LAYERS - length + 1)
        free = 0 if index % 10 == 0 else 4096
        peers.append(peer(f"p{index:05d}", start, start + length, rng.uniform(200, 2000), free=free, num_layers=LAYERS))
    return peers


def chain_cost(chain: list, cache_tokens: int) -> float:
    """The planner's estimate of a chain (no measured round trips, nobody proven)."""
    cost = 0.0
    for link in chain:
        cost += DEFAULT_HOP_SECONDS + layer_seconds(link.peer) * (link.end - link.start)
        if link.peer.cache_tokens_free < cache_tokens:
            cost += SHORT_CACHE_PENALTY_SECONDS
    return cost


def test_a_route_query_answers_a_few_peers_per_layer_and_they_hold_the_best_chain() -> None:
    state = RegistryState(max_peers=10_000)
    swarm = random_swarm(5000)
    for info in swarm:
        state.announce(info, ttl=15.0, now=0.0)
    candidates = state.route_candidates(1.0, "m", None, per_layer=3, cache_tokens=2048)
    assert len(candidates) <= 3 * LAYERS
    assert all(info.cache_tokens_free >= 2048 for info in candidates)  # plenty have room: the full ones never come
    best = plan_route(swarm, LAYERS, cache_tokens_needed=2048)
    from_candidates = plan_route(candidates, LAYERS, cache_tokens_needed=2048)
    assert from_candidates is not None
    assert chain_cost(from_candidates, 2048) <= chain_cost(best, 2048) * 1.01


def test_every_registry_answers_the_same_candidates_in_the_same_order_whatever_order_peers_announced_in() -> None:
    swarm = random_swarm(500, seed=1)
    answers = []
    for order in (swarm, swarm[::-1], random.Random(2).sample(swarm, len(swarm))):
        state = RegistryState()
        for info in order:
            state.announce(info, ttl=15.0, now=0.0)
        answers.append([info.peer_id for info in state.route_candidates(1.0, "m", None, per_layer=4)])
    assert answers[0] == answers[1] == answers[2]


def test_the_index_follows_a_peer_that_moves_expires_leaves_and_comes_back() -> None:
    state = RegistryState()
    state.announce(peer("a", 0, 4), ttl=3.0, now=0.0, owner="node-a")
    state.announce(peer("b", 4, 8), ttl=3.0, now=0.0, owner="node-b")

    def candidates(now: float) -> list[str]:
        return [info.peer_id for info in state.route_candidates(now, "m", None, per_layer=2)]

    def coverage(now: float) -> list[int]:
        models = state.view(now).models
        return models[0]["coverage"] if models else []

    assert candidates(1.0) == ["a", "b"] and coverage(1.0) == [1] * 8
    state.announce(peer("a", 0, 8), ttl=3.0, now=1.0, owner="node-a")  # a now serves every layer
    assert coverage(1.5) == [1, 1, 1, 1, 2, 2, 2, 2]
    state.announce(peer("a", 0, 8, state="draining"), ttl=3.0, now=2.0, owner="node-a")  # no longer routed to
    assert candidates(2.5) == ["b"] and coverage(2.5) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert candidates(3.5) == []  # b's heartbeats stopped at 0.0 with a ttl of 3 s
    assert state.leave("a", now=4.0, owner="node-a")
    assert candidates(4.0) == [] and state.view(4.0).states == {"gone": 2}
    state.announce(peer("b", 4, 8), ttl=3.0, now=5.0, owner="node-b2")  # b's expiry freed its id
    assert candidates(5.0) == ["b"]


def test_heartbeats_keep_a_peer_however_many_expiries_pass_and_a_shorter_ttl_takes_effect() -> None:
    state = RegistryState()
    for beat in range(100):  # every second, a ttl of 3 s: never once missing
        now = float(beat)
        state.announce(peer("steady", 0, 8), ttl=3.0, now=now)
        assert [info.peer_id for info in state.live_peers(now + 0.99)] == ["steady"]
    state.announce(peer("steady", 0, 8), ttl=30.0, now=100.0)
    state.announce(peer("steady", 0, 8), ttl=1.0, now=101.0)  # the latest announcement's ttl counts
    assert state.live_peers(101.9) and not state.live_peers(102.1)


def test_expiry_costs_what_it_removes() -> None:
    state = RegistryState(max_peers=20_000)
    for index in range(10_000):
        state.announce(peer(f"p{index}", 0, 8), ttl=15.0, now=index / 2000)
    for index in range(9_000):  # heartbeats for all but the last thousand
        state.announce(peer(f"p{index}", 0, 8), ttl=15.0, now=10.0)
    state.expire(20.0)
    assert len(state._expiry) == 9_000  # the expired peers' entries went, one entry per live peer stayed
    assert state.view(20.0).states == {"online": 9_000, "gone": 1_000}


def test_peers_without_room_only_top_up_a_layer_and_excluded_or_reported_ones_give_way() -> None:
    state = RegistryState(reports_to_exclude=1)
    for name, throughput, free in (("fast-full", 2000.0, 0), ("slow-roomy", 100.0, 4096), ("mid", 500.0, 4096)):
        state.announce(peer(name, 0, 8, throughput=throughput, free=free), ttl=30.0, now=0.0)

    def candidates(per_layer: int, exclude: tuple[str, ...] = ()) -> list[str]:
        found = state.route_candidates(1.0, "m", None, per_layer=per_layer, cache_tokens=1024, exclude=exclude)
        return sorted(info.peer_id for info in found)

    assert candidates(2) == ["mid", "slow-roomy"]
    assert candidates(3) == ["fast-full", "mid", "slow-roomy"]
    assert candidates(2, exclude=("mid",)) == ["fast-full", "slow-roomy"]
    state.report("slow-roomy", "10.0.0.1")
    assert candidates(2, exclude=("mid",)) == ["fast-full"]


def test_the_dashboards_view_is_a_page_of_peers_and_counts_whatever_the_swarm_size() -> None:
    state = RegistryState(max_peers=10_000)
    swarm = random_swarm(3000)
    for info in swarm:
        state.announce(info, ttl=15.0, now=0.0)
    state.mark_gone(swarm[0].peer_id, now=1.0)
    view = state.view(1.0, max_listed=50)
    assert len(view.rows) == 50 and view.unlisted == 2950
    assert view.states == {"online": 2999, "gone": 1}
    expected = [0] * LAYERS
    for info in swarm[1:]:
        for layer in range(info.start, info.end):
            expected[layer] += 1
    assert view.models[0]["coverage"] == expected and view.models[0]["peers"] == 2999
