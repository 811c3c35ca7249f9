"""Pure functions over the registry's view: coverage, missing layers, the fastest chain, free spans.

Nothing here does I/O, so the client, the registry's dashboard and `--layers auto` all share it and
tests need no network.
"""

from __future__ import annotations

import heapq
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
) -> list[Link] | None:
    """The chain over layers [start, end) with the least estimated time, or None if there is none.

    Each hop costs the peer's round trip plus its per-layer compute time for the layers it runs
    (plus a penalty when its free cache is short, and, when `proven` is given, when the peer is not in it);
    a hop may use any contiguous part of a peer's span, so overlapping peers combine freely. Dijkstra over
    layer boundaries.
    """
    end = num_layers if end is None else end
    rtt = rtt or {}
    usable = [peer for peer in serving(peers) if peer.peer_id not in banned and peer.num_layers == num_layers]
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, Link] = {}
    queue: list[tuple[float, int]] = [(0.0, start)]
    while queue:
        cost, layer = heapq.heappop(queue)
        if layer == end:
            break
        if cost > best.get(layer, float("inf")):
            continue
        for peer in usable:
            if not peer.start <= layer < peer.end:
                continue
            per_layer = layer_seconds(peer)
            hop = rtt.get(peer.peer_id, DEFAULT_HOP_SECONDS)
            if peer.cache_tokens_free < cache_tokens_needed:
                hop += SHORT_CACHE_PENALTY_SECONDS
            if proven is not None and peer.peer_id not in proven:
                hop += UNPROVEN_PENALTY_SECONDS
            for stop in range(layer + 1, min(peer.end, end) + 1):
                total = cost + hop + per_layer * (stop - layer)
                if total < best.get(stop, float("inf")):
                    best[stop] = total
                    came_from[stop] = Link(peer, layer, stop)
                    heapq.heappush(queue, (total, stop))
    if end not in came_from and start != end:
        return None
    chain: list[Link] = []
    layer = end
    while layer != start:
        link = came_from[layer]
        chain.append(link)
        layer = link.start
    return chain[::-1]


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
