"""Finding chains of peers that cover a model (or part of it), from any registry that answers."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from swarm.errors import MissingLayersError, RegistryUnavailableError
from swarm.protocol import Codec, PeerInfo
from swarm.registry.client import fetch_peers
from swarm.routing import Link, missing_ranges, plan_route
from swarm.transport import Credentials

log = logging.getLogger("swarm.client")

BAN_SECONDS = 15.0
"""First ban of a failed peer; each further failure within the ban doubles it (up to 10 minutes)."""
MAX_BAN_SECONDS = 600.0
DEFAULT_FAILOVER_WAIT = 60.0


@dataclass
class ChainPlanner:
    """Plans chains over one model's layers from the registries' current view, avoiding banned peers."""

    registries: list[str]
    model_name: str
    num_layers: int
    credentials: Credentials = field(default_factory=Credentials)
    failover_wait: float = DEFAULT_FAILOVER_WAIT
    compression: Codec = "raw"
    """Codec for hidden states sent to peers that advertise it; the others get `raw`."""
    _bans: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer_id -> (until, duration)
    _fetching: asyncio.Task[list[PeerInfo]] | None = None

    def codec_for(self, peer: PeerInfo) -> Codec:
        return self.compression if self.compression in peer.codecs else "raw"

    def ban(self, peer_id: str, now: float | None = None) -> float:
        """Keep a failed peer out of new chains for a while, longer each time it fails again."""
        now = time.monotonic() if now is None else now
        until, duration = self._bans.get(peer_id, (0.0, 0.0))
        duration = min(duration * 2, MAX_BAN_SECONDS) if until > now - duration else BAN_SECONDS
        self._bans[peer_id] = (now + duration, duration)
        return duration

    def banned(self, now: float | None = None) -> frozenset[str]:
        now = time.monotonic() if now is None else now
        return frozenset(peer_id for peer_id, (until, _) in self._bans.items() if until > now)

    async def plan(self, start: int = 0, end: int | None = None, cache_tokens_needed: int = 0) -> list[Link]:
        """The best chain over layers [start, end) now, or `MissingLayersError` naming the gaps."""
        end = self.num_layers if end is None else end
        peers = [p for p in await self._current_peers() if p.num_layers == self.num_layers]
        banned = self.banned()
        chain = plan_route(
            peers, self.num_layers, start=start, end=end, banned=banned, cache_tokens_needed=cache_tokens_needed
        )
        if chain is None:
            usable = [peer for peer in peers if peer.peer_id not in banned]
            missing = [
                (max(a, start), min(b, end))
                for a, b in missing_ranges(usable, self.num_layers)
                if a < end and b > start
            ]
            raise MissingLayersError(self.model_name, self.num_layers, missing or [(start, end)])
        log.debug("chain for %s: %s", self.model_name, describe_chain(chain))
        return chain

    async def _current_peers(self) -> list[PeerInfo]:
        """The registries' view of the model. Concurrent callers (a burst of new sessions, a gateway's requests
        arriving together) share one query: asked one by one, each would cost a connection to a registry."""
        if self._fetching is None or self._fetching.get_loop() is not asyncio.get_running_loop():
            self._fetching = asyncio.ensure_future(fetch_peers(self.registries, self.model_name, self.credentials))
            self._fetching.add_done_callback(self._fetched)
        return await asyncio.shield(self._fetching)

    def _fetched(self, task: asyncio.Task[list[PeerInfo]]) -> None:
        if self._fetching is task:
            self._fetching = None
        if not task.cancelled():
            task.exception()  # every waiter may have been cancelled; none of them must log it as unretrieved

    async def wait_for_chain(self, start: int, end: int, cache_tokens_needed: int = 0) -> list[Link]:
        """Like `plan`, but waits up to `failover_wait` seconds for peers to (re)appear."""
        deadline = time.monotonic() + self.failover_wait
        announced = False
        while True:
            try:
                return await self.plan(start, end, cache_tokens_needed)
            except (MissingLayersError, RegistryUnavailableError) as exc:
                if time.monotonic() >= deadline:
                    raise
                if not announced:
                    log.info("waiting up to %.0f s for peers: %s", self.failover_wait, exc)
                    announced = True
                await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))


def describe_chain(chain: list[Link]) -> str:
    return " -> ".join(f"{link.peer.address} [{link.start}:{link.end})" for link in chain)
