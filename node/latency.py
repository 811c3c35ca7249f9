"""Round trips from this node to the peers that may come after it in a chain, measured here and announced
(`PeerInfo.latencies_ms`): a client plans a forwarded chain with them (`swarm.routing.plan_route`), since a
forwarded step waits on the trip between two nodes, which the client cannot measure; the dashboard shows them.

The candidates come from a bounded route query (a few peers per layer), so probing costs the same in a swarm of
ten peers or ten thousand; each is measured with websocket pings over the connection relayed steps would use.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable

from swarm.errors import PeerUnreachableError, RegistryUnavailableError
from swarm.node.relay import RelayLinks
from swarm.protocol import MAX_LATENCIES, PeerInfo
from swarm.registry.client import RouteNeeds, fetch_peers
from swarm.routing import span_rank

log = logging.getLogger("swarm.node")

MAX_NEIGHBOURS = 8
"""Peers measured at once (at most `MAX_LATENCIES` may be announced)."""
PINGS = 3
"""Pings per measurement; the median is kept, so one late pong does not make a near peer look far."""
REMEASURE_SECONDS = 60.0
FIRST_PROBE_SECONDS = 1.0
"""The first listing comes this soon after the node is online, then the wait doubles up to the probe interval:
peers that start beside this one are measured within seconds, and a settled swarm is asked rarely."""


def could_follow(own: PeerInfo, peer: PeerInfo) -> bool:
    """Whether a chain may go from a hop on `own` straight to `peer`: some boundary inside or at the end of own's
    span (after at least one of its layers) is a layer `peer` serves."""
    return (
        peer.peer_id != own.peer_id
        and peer.model == own.model
        and peer.num_layers == own.num_layers
        and max(own.start + 1, peer.start) <= min(own.end, peer.end - 1)
    )


def neighbours(own: PeerInfo, peers: list[PeerInfo], limit: int = MAX_NEIGHBOURS) -> list[PeerInfo]:
    """The peers worth measuring: those that may follow `own`, first those serving the layer after its span
    (where most chains leave it), then by the planner's cost per layer."""
    candidates = [peer for peer in peers if peer.state == "online" and could_follow(own, peer)]
    candidates.sort(key=lambda peer: (not peer.start <= own.end < peer.end, span_rank(peer), peer.peer_id))
    return candidates[:limit]


class NeighbourLatencies:
    """Measures and remembers round trips to this node's neighbours; `announced()` is what goes in `PeerInfo`. It
    lists and pings them over `relays`' connections: those to the registries, and those relayed steps use."""

    def __init__(self, relays: RelayLinks, own: Callable[[], PeerInfo], interval: float) -> None:
        self.relays = relays
        self.own = own
        self.interval = interval
        self._measured: dict[str, tuple[float, float]] = {}  # peer_id -> (seconds, measured when)

    def announced(self) -> dict[str, float]:
        """Milliseconds to each measured neighbour, rounded to 0.1 ms."""
        items = sorted(self._measured.items(), key=lambda item: item[1][0])[:MAX_LATENCIES]
        return {peer_id: round(seconds * 1000, 1) for peer_id, (seconds, _) in items}

    async def run(self) -> None:
        """Probe until cancelled: soon after start, then ever less often, up to every `interval` seconds."""
        wait = FIRST_PROBE_SECONDS
        while True:
            await asyncio.sleep(min(wait, self.interval))
            wait *= 2
            try:
                await self.probe()
            except RegistryUnavailableError as exc:
                log.info("listing neighbours to measure: %s", exc)

    async def probe(self) -> None:
        """List the neighbours now, forget those no longer listed, and measure the new and the stale ones."""
        own = self.own()
        if own.state != "online":
            return
        relays = self.relays
        listed = await fetch_peers(
            relays.registries, own.model, relays.credentials, own.model_id, RouteNeeds(), relays.registry_pool
        )
        chosen = neighbours(own, listed)
        kept = {peer.peer_id for peer in chosen}
        self._measured = {peer_id: measured for peer_id, measured in self._measured.items() if peer_id in kept}
        now = time.monotonic()
        stale = [
            peer
            for peer in chosen
            if peer.peer_id not in self._measured or now - self._measured[peer.peer_id][1] > REMEASURE_SECONDS
        ]
        await asyncio.gather(*(self._measure(peer) for peer in stale))

    async def _measure(self, peer: PeerInfo) -> None:
        try:
            trips = [await self.relays.round_trip(peer.address) for _ in range(PINGS)]
        except PeerUnreachableError as exc:
            self._measured.pop(peer.peer_id, None)
            log.info("could not measure %s (%s): %s", peer.peer_id, peer.address, exc)
            return
        self._measured[peer.peer_id] = (statistics.median(trips), time.monotonic())
