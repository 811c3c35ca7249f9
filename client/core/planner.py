"""Finding chains of peers that cover a model (or part of it), from any registry that answers."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from swarm.client.core.addresses import AddressPolicy
from swarm.errors import (
    CheckpointError,
    MissingLayersError,
    RegistryUnavailableError,
    SwarmFullError,
    format_layer_range,
)
from swarm.identity import CheckpointDigests
from swarm.protocol import Codec, PeerInfo
from swarm.registry.client import RegistryPool, RouteNeeds, fetch_peers, report_peer
from swarm.routing import Link, missing_ranges, plan_route
from swarm.transport import Credentials

log = logging.getLogger("swarm.client")

BAN_SECONDS = 15.0
"""First ban of a failed peer; each further failure within the ban doubles it (up to 10 minutes)."""
MAX_BAN_SECONDS = 600.0
LIAR_BAN_SECONDS = 24 * 3600.0
"""A peer caught answering wrongly is not asked again by this client."""
BUSY_COOLDOWN_SECONDS = 3.0
"""A peer that answered `busy` (full, draining) is left out of new chains this long; it is not banned: it did
nothing wrong, and a ban that grows would keep an honest node away long after it has room again."""
DEFAULT_FAILOVER_WAIT = 60.0
MAX_REQUERIES = 16
"""Route queries one plan makes again after refusing peers of the answer: each leaves out what the last refused."""


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
    verify_rate: float = 0.0
    """Fraction of link steps computed again by other peers (`swarm.client.core.verify`); 0 checks none, not even a
    new peer's first step."""
    round_trips: dict[str, float] = field(default_factory=dict)
    """Measured round trip to each peer, in seconds (`observe_round_trip`): a hop's cost in route planning, so
    chains prefer near peers."""
    layer_seconds: dict[str, float] = field(default_factory=dict)
    """Compute seconds per layer of a one-token step on each peer, as this client measured them
    (`observe_compute`): a hop's compute cost in route planning in place of the peer's announced throughput, which
    is only a claim."""
    forwarding: bool = True
    """Steps of a session go node to node along its chain (`swarm.client.core.forwarding`); off: through the
    client between every two links."""
    digests: CheckpointDigests | None = None
    """The client's own checkpoint, to refuse peers serving other weights; None trusts what peers announce."""
    proven: set[str] = field(default_factory=set)
    """Peers that have answered this client's steps (and passed verification when it was asked for)."""
    _bans: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer_id -> (until, duration)
    _cooling: dict[str, float] = field(default_factory=dict)  # peer_id -> until (answered busy)
    _refused: set[str] = field(default_factory=set)  # peers whose identity was refused (logged once)
    _unusable: set[str] = field(default_factory=set)  # peers refused here (address, weights): left out of queries
    _fetching: tuple[RouteNeeds, asyncio.Task[list[PeerInfo]]] | None = None
    _view: tuple[RouteNeeds | None, float, list[PeerInfo]] = (None, -math.inf, [])  # the last answer, when it came
    addresses: AddressPolicy = field(init=False)
    registry_pool: RegistryPool | None = None
    """Connections to the registries kept between queries (shared with other planners when given)."""

    def __post_init__(self) -> None:
        self.addresses = AddressPolicy.for_registries(self.registries)
        if self.registry_pool is None:
            self.registry_pool = RegistryPool(self.credentials)

    async def close(self) -> None:
        """Close the connections to the registries (on the event loop the queries ran on)."""
        if self.registry_pool is not None:
            await self.registry_pool.close()

    def observe_round_trip(self, peer_id: str, seconds: float) -> None:
        """A round trip to `peer_id` just measured: kept as a moving average (a quarter of each new one)."""
        _average_in(self.round_trips, peer_id, seconds)

    def observe_answer(self, peer_id: str, layers: int, waited: float) -> None:
        """A one-token step sent to `peer_id` was answered `waited` seconds later: its round trip plus its compute
        over `layers` layers. A wait shorter than the measured round trip proves that round trip shorter (the
        handshake that measured it was slow), so the estimate comes down to the wait and this step times nothing;
        otherwise what the round trip does not explain is compute (`observe_compute`)."""
        trip = self.round_trips.get(peer_id)
        if trip is not None and waited < trip:
            self.round_trips[peer_id] = waited
            return
        self.observe_compute(peer_id, layers, waited - (trip or 0.0))

    def observe_compute(self, peer_id: str, layers: int, seconds: float) -> None:
        """A one-token step over `layers` layers of `peer_id` took `seconds` beyond the trips to and from it: kept
        per layer as a moving average (a quarter of each new one). A negative figure says the trips were estimated
        long (a slow handshake, a jittery link), not that compute was free: it is not kept."""
        if seconds < 0:
            return
        _average_in(self.layer_seconds, peer_id, seconds / max(layers, 1))

    def codec_for(self, peer: PeerInfo) -> Codec:
        return self.compression if self.compression in peer.codecs else "raw"

    def ban(self, peer_id: str, now: float | None = None) -> float:
        """Keep a failed peer out of new chains for a while, longer each time it fails again."""
        now = time.monotonic() if now is None else now
        until, duration = self._bans.get(peer_id, (0.0, 0.0))
        if duration >= LIAR_BAN_SECONDS and until > now:  # caught lying: the long ban stands
            return until - now
        duration = min(duration * 2, MAX_BAN_SECONDS) if until > now - duration else BAN_SECONDS
        self._bans[peer_id] = (now + duration, duration)
        return duration

    def ban_liar(self, peer: PeerInfo, reason: str) -> None:
        """A peer whose outputs two others contradicted: never used again by this client, and reported."""
        self._bans[peer.peer_id] = (time.monotonic() + LIAR_BAN_SECONDS, LIAR_BAN_SECONDS)
        self.proven.discard(peer.peer_id)
        log.warning("peer %s at %s answered wrongly (%s); banned and reported", peer.peer_id, peer.address, reason)
        task = asyncio.ensure_future(report_peer(self.registries, peer.peer_id, reason, self.credentials))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    def cool_down(self, peer_id: str, now: float | None = None) -> None:
        """Leave a peer that answered `busy` out of new chains for a moment, without banning it."""
        self._cooling[peer_id] = (time.monotonic() if now is None else now) + BUSY_COOLDOWN_SECONDS

    def _cooling_now(self, now: float) -> frozenset[str]:
        return frozenset(peer_id for peer_id, until in self._cooling.items() if until > now)

    def banned(self, now: float | None = None) -> frozenset[str]:
        """Peers left out of new chains now: banned ones and those cooling down after `busy`."""
        now = time.monotonic() if now is None else now
        bans = frozenset(peer_id for peer_id, (until, _) in self._bans.items() if until > now)
        return bans | self._cooling_now(now)

    async def plan(
        self,
        start: int = 0,
        end: int | None = None,
        cache_tokens_needed: int = 0,
        avoid: frozenset[str] = frozenset(),
        max_age: float = 0.0,
        forwarded: bool | None = None,
    ) -> list[Link]:
        """The best chain over layers [start, end) now (without the peers in `avoid`), or `MissingLayersError`
        naming the gaps, or `SwarmFullError` when the only chains go through peers that just answered `busy`.
        `max_age`: a view of the swarm this many seconds old will do (a registry query saved). `forwarded`: whether
        the chain's steps will go node to node (default: `forwarding`), which prices junctions by the round trips
        peers measured to each other."""
        forwarded = self.forwarding if forwarded is None else forwarded
        end = self.num_layers if end is None else end
        now = time.monotonic()
        banned = self.banned(now) | avoid
        needs = RouteNeeds(cache_tokens=cache_tokens_needed, exclude=banned)
        refused_before = len(self._unusable)
        peers = await self.usable_peers(max_age, needs)

        def route(excluded: frozenset[str], among: list[PeerInfo]) -> list[Link] | None:
            return plan_route(
                among,
                self.num_layers,
                start=start,
                end=end,
                banned=excluded,
                rtt=self.round_trips,
                cache_tokens_needed=cache_tokens_needed,
                proven=frozenset(self.proven),
                forwarding=forwarded,
                measured_layer_seconds=self.layer_seconds,
            )

        chain = route(banned, peers)
        for _ in range(MAX_REQUERIES):
            # an older answer may lack spares for what is avoided now, and peers this client just refused (other
            # weights, addresses it may not reach) may have taken the places of usable ones: ask again without them
            if chain is not None or (max_age <= 0 and len(self._unusable) == refused_before):
                break
            max_age, refused_before = 0.0, len(self._unusable)
            peers = await self.usable_peers(0.0, needs)
            chain = route(banned, peers)
        if chain is None and await self._through_cooling(route, banned, now, cache_tokens_needed):
            raise SwarmFullError(
                f"the swarm is full for layers {format_layer_range(start, end)} of {self.model_name}: every peer that "
                f"could serve them answered busy (full or draining) in the last {BUSY_COOLDOWN_SECONDS:g} s. Try again "
                f"shortly, use a shorter max_length, or start more nodes."
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

    async def _through_cooling(
        self,
        route: Callable[[frozenset[str], list[PeerInfo]], list[Link] | None],
        banned: frozenset[str],
        now: float,
        cache_tokens_needed: int,
    ) -> bool:
        """Whether a chain exists once the peers that just answered `busy` are counted in again: the registries
        were asked without them, so they are asked once more, with them."""
        cooling = self._cooling_now(now)
        if not cooling & banned:
            return False
        needs = RouteNeeds(cache_tokens=cache_tokens_needed, exclude=banned - cooling)
        return route(banned - cooling, await self.usable_peers(0.0, needs)) is not None

    async def usable_peers(self, max_age: float = 0.0, needs: RouteNeeds | None = None) -> list[PeerInfo]:
        """The registries' candidates for a chain (`needs`: how many per layer, the cache they must have free, the
        peers left out), without peers this client must not use: another layer count, an address it may not reach
        from here, or weights that are not its checkpoint's. Those are left out of its next queries too."""
        needs = needs or RouteNeeds(exclude=frozenset(self._unusable))
        needs = RouteNeeds(needs.per_layer, needs.cache_tokens, needs.exclude | self._unusable)
        peers = []
        for peer in await self._current_peers(max_age, needs):
            if peer.num_layers == self.num_layers and self.addresses.allows(peer.address):
                peers.append(peer)
            else:
                self._unusable.add(peer.peer_id)
        if self.digests is None:
            return peers
        kept = []
        for peer in peers:
            if await self._same_weights(peer):
                kept.append(peer)
                continue
            self._unusable.add(peer.peer_id)
            if peer.peer_id not in self._refused:
                self._refused.add(peer.peer_id)
                log.warning(
                    "peer %s at %s serves other weights than %s under its name (model_id %s, weights %s); not used",
                    peer.peer_id,
                    peer.address,
                    self.digests.root,
                    peer.model_id,
                    peer.weights,
                )
        return kept

    async def _same_weights(self, peer: PeerInfo) -> bool:
        digests = self.digests
        assert digests is not None
        if peer.model_id != digests.model_id or peer.weights is None:
            return False
        expected = digests.known(peer.start, peer.end)
        if expected is None:
            try:
                expected = await asyncio.to_thread(digests.span, peer.start, peer.end)
            except CheckpointError as exc:  # the client lacks those layers' files: it cannot check them
                if peer.peer_id not in self._refused:
                    self._refused.add(peer.peer_id)
                    log.warning("cannot check the weights of %s: %s", peer.address, exc)
                return True
        return peer.weights == expected

    async def _current_peers(self, max_age: float, needs: RouteNeeds) -> list[PeerInfo]:
        """The registries' candidates for `needs`. Concurrent callers with the same needs (a burst of new sessions,
        a gateway's requests arriving together) share one query: asked one by one, each would cost a connection to
        a registry. With `max_age`, the last answer to the same needs does if it is that recent."""
        asked, fetched_at, peers = self._view
        if max_age > 0 and asked is not None and asked.covers(needs) and time.monotonic() - fetched_at <= max_age:
            return peers
        fetching = self._fetching
        if fetching is None or fetching[0] != needs or fetching[1].get_loop() is not asyncio.get_running_loop():
            model_id = self.digests.model_id if self.digests is not None else None
            task = asyncio.ensure_future(
                fetch_peers(self.registries, self.model_name, self.credentials, model_id, needs, self.registry_pool)
            )
            fetching = self._fetching = (needs, task)
            task.add_done_callback(partial(self._fetched, needs))
        return await asyncio.shield(fetching[1])

    def _fetched(self, needs: RouteNeeds, task: asyncio.Task[list[PeerInfo]]) -> None:
        if self._fetching is not None and self._fetching[1] is task:
            self._fetching = None
        if not task.cancelled() and task.exception() is None:  # retrieved: every waiter may have been cancelled
            self._view = (needs, time.monotonic(), task.result())

    async def wait_for_chain(
        self, start: int, end: int, cache_tokens_needed: int = 0, avoid: frozenset[str] = frozenset()
    ) -> list[Link]:
        """Like `plan`, but waits up to `failover_wait` seconds for peers to (re)appear."""
        deadline = time.monotonic() + self.failover_wait
        announced = False
        while True:
            try:
                return await self.plan(start, end, cache_tokens_needed, avoid)
            except (MissingLayersError, RegistryUnavailableError, SwarmFullError) as exc:
                if time.monotonic() >= deadline:
                    raise
                if not announced:
                    log.info("waiting up to %.0f s for peers: %s", self.failover_wait, exc)
                    announced = True
                await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))


def _average_in(averages: dict[str, float], peer_id: str, value: float) -> None:
    """A new measurement of `peer_id`, kept as a moving average that takes a quarter of each new one."""
    previous = averages.get(peer_id)
    averages[peer_id] = value if previous is None else 0.75 * previous + 0.25 * value


def describe_chain(chain: list[Link]) -> str:
    return " -> ".join(f"{link.peer.address} [{link.start}:{link.end})" for link in chain)
