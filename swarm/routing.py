"""Pure functions over the registry's view: coverage, missing layers, the fastest chain, free spans.

Nothing here does I/O, so the client, the registry's dashboard and `--layers auto` all share it and
tests need no network.
"""

from __future__ import annotations

import itertools
import math
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
    measured_layer_seconds: Mapping[str, float] | None = None,
) -> list[Link] | None:
    """The chain over layers [start, end) with the least estimated time per token, or None if there is none.

    Each hop costs its peer's compute time for the layers it runs (what the client measured per layer and token,
    `measured_layer_seconds`, where it has; else what the peer announces), plus a penalty when its free cache is short,
    and, when `proven` is given, when the peer is not in it); a hop may use any contiguous part of a peer's span,
    so overlapping peers combine freely. Between hops the hidden states travel: through the client, a round trip
    to each peer (`rtt`, measured by the client). With `forwarding` the client's one-way trips to the first peer
    and from the last count, and between two hops the one-way trip the first peer measured to the second
    (`PeerInfo.latencies_ms`); a junction nobody measured is assumed to go through the client (the triangle
    inequality's bound), so without measurements both ways of stepping cost the same and only measured near
    pairs make a difference.

    Layer boundaries only grow along a chain, so this is dynamic programming over them, boundary by boundary: the
    cheapest way to have the hidden states on each peer after it ran the layer before the boundary. Junctions are
    priced pair by pair (a measured trip slower than the way through the client counts as measured, since a
    forwarded step takes it); the unmeasured ones all leave through the client, so for each peer the cheapest
    holder to come from is the first of the boundary's holders, sorted once, that has not measured it.
    """
    end = num_layers if end is None else end
    if start == end:
        return []
    rtt = rtt or {}
    usable = [peer for peer in serving(peers) if peer.peer_id not in banned and peer.num_layers == num_layers]
    trip = [rtt.get(peer.peer_id, DEFAULT_HOP_SECONDS) / (2 if forwarding else 1) for peer in usable]
    back = {AT_CLIENT: 0.0} | {position: one_way if forwarding else 0.0 for position, one_way in enumerate(trip)}
    entry = [0.0] * len(usable)  # what taking a peer into a chain costs beyond the trip to it
    for position, peer in enumerate(usable):
        if peer.cache_tokens_free < cache_tokens_needed:
            entry[position] += SHORT_CACHE_PENALTY_SECONDS
        if proven is not None and peer.peer_id not in proven:
            entry[position] += UNPROVEN_PENALTY_SECONDS
    measured = measured_layer_seconds or {}
    per_layer = [measured.get(peer.peer_id, layer_seconds(peer)) for peer in usable]
    covering: dict[int, list[int]] = {layer: [] for layer in range(start, end)}
    for position, peer in enumerate(usable):
        for layer in range(max(peer.start, start), min(peer.end, end)):
            covering[layer].append(position)
    # holder -> (next peer, one-way seconds) it measured; the client measures no junction
    measured_from: dict[int, list[tuple[int, float]]] = {holder: [] for holder in range(AT_CLIENT, len(usable))}
    measured_into: list[set[int]] = [set() for _ in usable]  # peer -> holders that measured their trip to it
    if forwarding:
        index = {peer.peer_id: position for position, peer in enumerate(usable)}
        for holder, peer in enumerate(usable):
            for peer_id, milliseconds in peer.latencies_ms.items():
                position = index.get(peer_id)
                if position is not None and position != holder:
                    measured_from[holder].append((position, milliseconds / 2000))
                    measured_into[position].add(holder)

    at_boundary: dict[int, float] = {AT_CLIENT: 0.0}  # holder -> least cost of having the states there
    came_from: dict[tuple[int, int], int] = {}  # (boundary, holder) -> the holder one boundary before
    for layer in range(start, end):
        leaving = sorted((cost + back[holder], holder) for holder, cost in at_boundary.items())  # cheapest first
        arrived: dict[int, tuple[float, int]] = {}  # peer -> (cost, the holder before it)
        for position in covering[layer]:
            if position in at_boundary:
                _arrive(arrived, position, at_boundary[position] + per_layer[position], position)
            for cost, holder in leaving:
                if holder != position and holder not in measured_into[position]:
                    _arrive(arrived, position, cost + trip[position] + entry[position] + per_layer[position], holder)
                    break
        for holder, cost in at_boundary.items():
            for position, one_way in measured_from[holder]:
                if usable[position].start <= layer < usable[position].end:
                    _arrive(arrived, position, cost + one_way + entry[position] + per_layer[position], holder)
        for position, (_, holder) in arrived.items():
            came_from[(layer + 1, position)] = holder
        if not arrived:
            return None
        at_boundary = {position: cost for position, (cost, _) in arrived.items()}
    _, last = min((cost + back[holder], holder) for holder, cost in at_boundary.items())
    return _links_along(came_from, start, end, last, usable)


AT_CLIENT = -1
"""The holder of the hidden states before the first hop (`plan_route`)."""


def _arrive(arrived: dict[int, tuple[float, int]], position: int, cost: float, holder: int) -> None:
    """Keep the cheaper way to have the states on `position` (ties: the first way found)."""
    if cost < arrived.get(position, (math.inf, 0))[0]:
        arrived[position] = (cost, holder)


def _links_along(
    came_from: Mapping[tuple[int, int], int], start: int, end: int, last: int, usable: Sequence[PeerInfo]
) -> list[Link]:
    """The chain whose last hop ends at `end` on `last`: a holder one boundary after itself extends its hop, any
    other starts a new one."""
    holders = [last]
    for boundary in range(end, start, -1):
        holders.append(came_from[(boundary, holders[-1])])
    holders.reverse()  # holders[i]: who holds the states at boundary start + i (the client at start)
    chain: list[Link] = []
    for offset, (before, holder) in enumerate(itertools.pairwise(holders)):
        boundary = start + offset + 1
        if before == holder:
            chain[-1] = Link(usable[holder], chain[-1].start, boundary)
        else:
            chain.append(Link(usable[holder], boundary - 1, boundary))
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
