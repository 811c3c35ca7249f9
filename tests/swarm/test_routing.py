"""Route planning and coverage as pure functions over peer announcements."""

from __future__ import annotations

import pytest

from swarm.protocol import PeerInfo
from swarm.routing import coverage, describe_models, least_covered_span, missing_ranges, plan_route


def peer(
    peer_id: str,
    start: int,
    end: int,
    throughput: float = 1000.0,
    state: str = "online",
    free: int = 1000,
    num_layers: int = 8,
    latencies_ms: dict[str, float] | None = None,
) -> PeerInfo:
    return PeerInfo(
        peer_id=peer_id,
        address=f"ws://127.0.0.1/{peer_id}",
        model="m",
        num_layers=num_layers,
        start=start,
        end=end,
        state=state,
        dtype="float32",
        throughput=throughput,
        cache_tokens_free=free,
        cache_tokens_total=1000,
        latencies_ms=latencies_ms or {},
    )


def spans(chain: list) -> list[tuple[str, int, int]]:
    return [(link.peer.peer_id, link.start, link.end) for link in chain]


def test_two_halves_make_a_chain() -> None:
    chain = plan_route([peer("b", 4, 8), peer("a", 0, 4)], 8)
    assert spans(chain) == [("a", 0, 4), ("b", 4, 8)]


def test_one_peer_with_everything_beats_two_hops() -> None:
    chain = plan_route([peer("a", 0, 4), peer("b", 4, 8), peer("all", 0, 8)], 8)
    assert spans(chain) == [("all", 0, 8)]


def test_overlapping_spans_combine_through_sub_ranges() -> None:
    chain = plan_route([peer("a", 0, 5), peer("b", 3, 8)], 8)
    assert chain is not None
    assert chain[0].start == 0 and chain[-1].end == 8
    assert all(link.peer.start <= link.start < link.end <= link.peer.end for link in chain)
    assert [link.end for link in chain[:-1]] == [link.start for link in chain[1:]]


def test_slow_peers_are_avoided() -> None:
    chain = plan_route([peer("slow", 0, 8, throughput=1.0), peer("a", 0, 4), peer("b", 4, 8)], 8)
    assert spans(chain) == [("a", 0, 4), ("b", 4, 8)]


def test_a_compute_time_the_client_measured_wins_over_the_announced_one() -> None:
    """A peer announcing the fastest span is only believed until the client has timed it."""
    boastful, honest = peer("boastful", 0, 8, throughput=100_000.0), peer("honest", 0, 8, throughput=1000.0)
    assert [link.peer.peer_id for link in plan_route([boastful, honest], 8)] == ["boastful"]
    measured = {"boastful": 0.05}  # 50 ms a layer, as timed
    assert [link.peer.peer_id for link in plan_route([boastful, honest], 8, measured_layer_seconds=measured)] == [
        "honest"
    ]
    timed_fast = {"boastful": 0.05, "honest": 0.0001}
    assert plan_route([boastful, honest], 8, measured_layer_seconds=timed_fast)[0].peer.peer_id == "honest"


def test_peers_short_of_cache_are_a_last_resort() -> None:
    chain = plan_route([peer("full", 0, 8, free=10), peer("a", 0, 4), peer("b", 4, 8)], 8, cache_tokens_needed=100)
    assert [link.peer.peer_id for link in chain] == ["a", "b"]
    chain = plan_route([peer("full", 0, 8, free=10)], 8, cache_tokens_needed=100)
    assert spans(chain) == [("full", 0, 8)]


def test_joining_banned_and_foreign_peers_are_not_used() -> None:
    peers = [peer("a", 0, 4), peer("j", 4, 8, state="joining"), peer("x", 4, 8), peer("other", 4, 16, num_layers=16)]
    assert plan_route(peers, 8, banned=frozenset({"x"})) is None
    assert spans(plan_route(peers, 8)) == [("a", 0, 4), ("x", 4, 8)]


def test_missing_ranges_are_maximal_runs() -> None:
    peers = [peer("a", 1, 3), peer("b", 5, 6)]
    assert missing_ranges(peers, 8) == [(0, 1), (3, 5), (6, 8)]
    assert coverage([*peers, peer("c", 2, 6)], 8) == [0, 1, 2, 1, 1, 2, 0, 0]


def test_least_covered_span_prefers_gaps_then_lowest_index() -> None:
    assert least_covered_span([peer("a", 0, 4)], 8, 4) == (4, 8)
    assert least_covered_span([], 8, 3) == (0, 3)
    assert least_covered_span([peer("a", 0, 8), peer("b", 0, 2)], 8, 2) == (2, 4)


def test_describe_models_reports_usability() -> None:
    [model] = describe_models([peer("a", 0, 4)])
    assert model["usable"] is False and model["missing"] == [[4, 8]] and model["coverage"][:5] == [1, 1, 1, 1, 0]


def test_peers_this_client_has_not_seen_answer_pay_a_penalty() -> None:
    stranger, proven = peer("stranger", 0, 8), peer("proven", 0, 8)
    assert [link.peer.peer_id for link in plan_route([stranger, proven], 8, proven=frozenset({"proven"}))] == ["proven"]
    halves = [peer("a", 0, 4), peer("b", 4, 8)]
    assert len(plan_route([stranger, *halves], 8, proven=frozenset({"a", "b"}))) == 2  # two known hops win


def test_a_forwarded_chain_goes_to_the_next_peer_its_first_peer_measured_near() -> None:
    """The client is as far from both second-half peers, so only the first peer's measurements tell them apart."""
    first = peer("a", 0, 4, latencies_ms={"far": 80.0, "near": 2.0})
    peers = [first, peer("far", 4, 8), peer("near", 4, 8)]
    rtt = {"a": 0.030, "far": 0.030, "near": 0.030}
    assert spans(plan_route(peers, 8, rtt=rtt, forwarding=True)) == [("a", 0, 4), ("near", 4, 8)]
    first_listed_far = [first, peer("near", 4, 8), peer("far", 4, 8)]
    assert spans(plan_route(first_listed_far, 8, rtt=rtt, forwarding=True)) == [("a", 0, 4), ("near", 4, 8)]


def test_an_unmeasured_junction_costs_the_way_through_the_client() -> None:
    """Forwarding to a peer nobody measured is assumed as slow as going through the client (the triangle
    inequality's bound), so a peer the client measured near beats one the first peer measured middling only
    when going through the client would really be faster."""
    rtt = {"a": 0.010, "x": 0.004, "y": 0.100}
    first = peer("a", 0, 4, latencies_ms={"y": 30.0})
    peers = [first, peer("x", 4, 8), peer("y", 4, 8)]
    # via x: 5 ms + 2 ms (unmeasured: back to the client and out) + 2 ms = 9 ms; via y: 5 + 15 + 50 ms back
    assert spans(plan_route(peers, 8, rtt=rtt, forwarding=True)) == [("a", 0, 4), ("x", 4, 8)]
    # the client's own round trips alone order the same chains as before when nothing was measured
    assert spans(plan_route([peer("a", 0, 4), *peers[1:]], 8, rtt=rtt)) == [("a", 0, 4), ("x", 4, 8)]


def test_without_forwarding_measured_junctions_change_nothing() -> None:
    first = peer("a", 0, 4, latencies_ms={"far": 500.0})
    peers = [first, peer("far", 4, 8), peer("near", 4, 8)]
    rtt = {"a": 0.030, "far": 0.020, "near": 0.025}
    assert spans(plan_route(peers, 8, rtt=rtt)) == [("a", 0, 4), ("far", 4, 8)]
    assert spans(plan_route(peers, 8, rtt=rtt, forwarding=True)) == [("a", 0, 4), ("near", 4, 8)]


def test_a_forwarded_chain_may_leave_a_span_early_for_a_faster_measured_peer() -> None:
    """Hops use any part of a span: the first peer runs 3 of its 6 layers and forwards to a twice-as-fast peer
    it measured near (16 ms per token), rather than running all 6 and going to the far one (218 ms)."""
    peers = [peer("a", 0, 6, latencies_ms={"b": 1.0}), peer("b", 3, 8, throughput=2000.0), peer("c", 6, 8)]
    rtt = {"a": 0.010, "b": 0.010, "c": 0.200}
    assert spans(plan_route(peers, 8, rtt=rtt, forwarding=True)) == [("a", 0, 3), ("b", 3, 8)]


def test_a_chain_over_a_sub_range_and_an_empty_range() -> None:
    peers = [peer("a", 0, 4, latencies_ms={"b": 1.0}), peer("b", 2, 8)]
    assert spans(plan_route(peers, 8, start=2, end=6, forwarding=True)) == [("b", 2, 6)]
    assert plan_route(peers, 8, start=3, end=3) == []


def chain_cost(chain: list, rtt: dict[str, float], forwarding: bool) -> float:
    """What a chain costs by the documented model, written out hop by hop."""
    total = 0.0
    for number, link in enumerate(chain):
        peer_rtt = rtt.get(link.peer.peer_id, 0.002)
        total += (link.end - link.start) / link.peer.throughput
        if not forwarding:
            total += peer_rtt
            continue
        if number == 0:
            total += peer_rtt / 2
        else:
            before = chain[number - 1].peer
            measured = before.latencies_ms.get(link.peer.peer_id)
            total += measured / 2000 if measured is not None else rtt.get(before.peer_id, 0.002) / 2 + peer_rtt / 2
        if number == len(chain) - 1:
            total += peer_rtt / 2
    return total


def every_chain(peers: list[PeerInfo], start: int, end: int) -> list[list]:
    if start == end:
        return [[]]
    from swarm.routing import Link

    chains = []
    for candidate in peers:
        if candidate.start <= start < candidate.end:
            for stop in range(start + 1, min(candidate.end, end) + 1):
                chains += [[Link(candidate, start, stop), *rest] for rest in every_chain(peers, stop, end)]
    return chains


def test_the_planned_chain_is_the_cheapest_of_all_chains_in_random_swarms() -> None:
    """Against brute force over every chain, in both ways of stepping, with random spans, speeds, round trips and
    measurements (some slower than the way through the client)."""
    import random

    rng = random.Random(5)
    for _ in range(300):
        layers = rng.randint(1, 5)
        names = [f"p{i}" for i in range(rng.randint(1, 5))]
        peers = []
        for name in names:
            first = rng.randrange(layers)
            measured = {other: rng.uniform(0.5, 120.0) for other in names if other != name and rng.random() < 0.5}
            one = peer(
                name,
                first,
                rng.randint(first + 1, layers),
                throughput=rng.uniform(50, 2000.0),
                num_layers=layers,
                latencies_ms=measured,
            )
            peers.append(one)
        rtt = {name: rng.uniform(0.001, 0.1) for name in names if rng.random() < 0.8}
        for forwarding in (False, True):
            chains = every_chain(peers, 0, layers)
            planned = plan_route(peers, layers, rtt=rtt, forwarding=forwarding)
            if not chains:
                assert planned is None
                continue
            best = min(chain_cost(chain, rtt, forwarding) for chain in chains)
            assert planned is not None
            assert chain_cost(planned, rtt, forwarding) == pytest.approx(best, rel=1e-9, abs=1e-12)
