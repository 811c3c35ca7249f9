"""Pure functions over the registry's view: coverage, missing layers, the fastest chain, free spans.

Nothing here does I/O, so the client, the registry's dashboard and `--layers auto` all share it and
tests need no network.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from swarm.protocol import PeerInfo

DEFAULT_HOP_SECONDS = 0.002
"""Assumed round trip to a peer we have not measured yet."""

SHORT_CACHE_PENALTY_SECONDS = 10.0
"""Added to a peer whose free cache cannot hold the session, so it is picked only as a last resort."""

UNPROVEN_PENALTY_SECONDS = 0.05
"""Added to a peer this client has not yet seen answer a step: what a peer announces about itself is only a
claim, so a chain of peers that have served us beats one of strangers promising more."""

MAX_CLAIMED_THROUGHPUT = 100_000.0
"""Layer-steps per second beyond which an announced throughput is not believed (a fast GPU does a few thousand)."""


@dataclass(frozen=True)
class Link:
    """One hop of a chain: layers [start, end) on `peer` (a contiguous sub-range of its span)."""

    peer: PeerInfo
    start: int
    end: int


def serving(peers: Iterable[PeerInfo]) -> list[PeerInfo]:
    return [peer for peer in peers if peer.state == "online"]


def coverage(peers: Iterable[PeerInfo], num_layers: int) -> list[int]:
    """How many online peers serve each layer."""
    counts = [0] * num_layers
    for peer in serving(peers):
        for layer in range(peer.start, min(peer.end, num_layers)):
            counts[layer] += 1
    return counts


def missing_ranges(peers: Iterable[PeerInfo], num_layers: int) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of layers no online peer serves."""
    return gaps(coverage(peers, num_layers))


def gaps(counts: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of layers whose count (of online peers) is zero."""
    ranges: list[tuple[int, int]] = []
    for layer, count in enumerate(counts):
        if count:
            continue
        if ranges and ranges[-1][1] == layer:
            ranges[-1] = (ranges[-1][0], layer + 1)
        else:
            ranges.append((layer, layer + 1))
    return ranges


def layer_seconds(peer: PeerInfo) -> float:
    """What one layer costs on `peer`, by its announced throughput (capped at what any GPU could claim)."""
    return 1.0 / min(peer.throughput, MAX_CLAIMED_THROUGHPUT) if peer.throughput > 0 else 0.01


def span_rank(peer: PeerInfo) -> float:
    """The planner's cost per layer of a hop over `peer`'s whole span, as anyone can tell from its announcement
    (an unmeasured round trip, no penalties): registries keep each layer's peers in this order and answer route
    queries with the first few, which the client then plans over with its own costs."""
    return layer_seconds(peer) + DEFAULT_HOP_SECONDS / (peer.end - peer.start)


def plan_route(
    peers: Sequence[PeerInfo],
    num_layers: int,
    *,
    start: int = 0,
    end: int | None = None,
    rtt: Mapping[str, float] | None = None,
    banned: frozenset[str] = frozenset(),
    cache_tokens_needed: int = 0,
    proven: frozenset[str] | None = None,
    forwarding: bool = False,
) -> list[Link] | None:
    """The chain over layers [start, end) with the least estimated time per token, or None if there is none.

    Each hop costs its peer's compute time for the layers it runs (plus a penalty when its free cache is short,
    and, when `proven` is given, when the peer is not in it); a hop may use any contiguous part of a peer's span,
    so overlapping peers combine freely. Between hops the hidden states travel: through the client, a round trip
    to each peer (`rtt`, measured by the client). With `forwarding` the client's one-way trips to the first peer
    and from the last count, and between two hops the one-way trip the first peer measured to the second
    (`PeerInfo.latencies_ms`); a junction nobody measured is assumed to go through the client (the triangle
    inequality's bound), so without measurements both ways of stepping cost the same and only measured near
    pairs make a difference.

    Dijkstra over where the hidden states are at each layer boundary: at the client, or on a peer after it ran
    the layer before the boundary (forwarded, each junction is priced pair by pair: a measured trip slower than
    the way through the client counts as measured, since a forwarded step takes it).
    """
    end = num_layers if end is None else end
    if start == end:
        return []
    rtt = rtt or {}
    usable = [peer for peer in serving(peers) if peer.peer_id not in banned and peer.num_layers == num_layers]
    trip = [rtt.get(peer.peer_id, DEFAULT_HOP_SECONDS) / (2 if forwarding else 1) for peer in usable]
    back = [one_way if forwarding else 0.0 for one_way in trip]
    entry = [0.0] * len(usable)  # what taking a peer into a chain costs beyond the trip to it
    for position, peer in enumerate(usable):
        if peer.cache_tokens_free < cache_tokens_needed:
            entry[position] += SHORT_CACHE_PENALTY_SECONDS
        if proven is not None and peer.peer_id not in proven:
            entry[position] += UNPROVEN_PENALTY_SECONDS
    per_layer = [layer_seconds(peer) for peer in usable]
    covering: dict[int, list[int]] = {layer: [] for layer in range(start, end)}
    for position, peer in enumerate(usable):
        for layer in range(max(peer.start, start), min(peer.end, end)):
            covering[layer].append(position)

    AT_CLIENT = -1
    best: dict[tuple[int, int], float] = {(start, AT_CLIENT): 0.0}
    came_from: dict[tuple[int, int], tuple[int, int]] = {}
    queue: list[tuple[float, int, int]] = [(0.0, start, AT_CLIENT)]

    def reach(state: tuple[int, int], cost: float, previous: tuple[int, int]) -> None:
        if cost < best.get(state, float("inf")):
            best[state] = cost
            came_from[state] = previous
            heapq.heappush(queue, (cost, *state))

    while queue:
        cost, layer, holder = heapq.heappop(queue)
        state = (layer, holder)
        if state == (end, AT_CLIENT):
            break
        if cost > best.get(state, float("inf")):
            continue
        if holder == AT_CLIENT:
            for position in covering.get(layer, ()):
                reach((layer + 1, position), cost + trip[position] + entry[position] + per_layer[position], state)
            continue
        if layer == end or not forwarding:  # forwarded, the hidden states go back to the client only at the end
            reach((layer, AT_CLIENT), cost + back[holder], state)
        if layer == end:
            continue
        if layer < usable[holder].end:
            reach((layer + 1, holder), cost + per_layer[holder], state)
        if forwarding:
            measured = usable[holder].latencies_ms
            for position in covering[layer]:
                if position == holder:
                    continue
                milliseconds = measured.get(usable[position].peer_id)
                junction = back[holder] + trip[position] if milliseconds is None else milliseconds / 2000
                reach((layer + 1, position), cost + junction + entry[position] + per_layer[position], state)
    if (end, AT_CLIENT) not in came_from:
        return None
    return _links_along(came_from, (end, AT_CLIENT), usable)


def _links_along(
    came_from: Mapping[tuple[int, int], tuple[int, int]], goal: tuple[int, int], usable: Sequence[PeerInfo]
) -> list[Link]:
    """The chain of a path of (boundary, holder) states: each state on a peer after a different holder starts a
    hop (from the client, or forwarded), and the same holder one boundary on extends it."""
    states = [goal]
    while states[-1] in came_from:
        states.append(came_from[states[-1]])
    states.reverse()
    chain: list[Link] = []
    for previous, (layer, holder) in itertools.pairwise(states):
        if holder < 0:
            continue
        if previous[1] == holder and previous[0] == layer - 1:
            chain[-1] = Link(usable[holder], chain[-1].start, layer)
        else:
            chain.append(Link(usable[holder], layer - 1, layer))
    return chain


def least_covered_span(peers: Iterable[PeerInfo], num_layers: int, length: int) -> tuple[int, int]:
    """The run of `length` layers with the least coverage (fewest peers on its weakest layer, then
    fewest in total), ties going to the lowest index: where a new node helps the swarm most."""
    length = max(1, min(length, num_layers))
    counts = coverage(peers, num_layers)
    best_start = min(
        range(num_layers - length + 1),
        key=lambda first: (min(counts[first : first + length]), sum(counts[first : first + length]), first),
    )
    return best_start, best_start + length


def describe_models(peers: Sequence[PeerInfo]) -> list[dict[str, object]]:
    """Coverage of every model the peers serve, as JSON-ready data (status CLI and dashboard)."""
    described = []
    for name, num_layers in sorted({(peer.model, peer.num_layers) for peer in peers}):
        own = [peer for peer in peers if peer.model == name and peer.num_layers == num_layers]
        described.append(describe_model(name, coverage(own, num_layers), len(own)))
    return described


def describe_model(name: str, counts: Sequence[int], peers: int) -> dict[str, object]:
    """One model's coverage as JSON-ready data: online peers per layer (`counts`), its gaps, and its live peers."""
    missing = gaps(counts)
    return {
        "name": name,
        "num_layers": len(counts),
        "coverage": list(counts),
        "missing": [list(span) for span in missing],
        "usable": not missing,
        "peers": peers,
    }
