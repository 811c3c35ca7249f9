"""Talking to registries from a client or a node: the route query every one of them asks, and reports of peers
caught lying."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection

from swarm.errors import PeerUnreachableError, ProtocolError, RegistryUnavailableError, RemoteError
from swarm.protocol import MAX_EXCLUDED, Ack, PeerInfo, Query, Report, SwarmView
from swarm.transport import Credentials, ReplyT, open_connection, request

log = logging.getLogger("swarm.client")

REGISTRY_TIMEOUT = 5.0
MAX_IDLE_PER_REGISTRY = 4
"""Idle connections a pool keeps to one registry (as many as a client's concurrent queries usually are)."""
ROUTE_CANDIDATES = 4
"""Peers per layer a route query asks for: the best, and spares for a client whose first choices fail or are busy,
without asking again."""


class RegistryPool:
    """Connections to registries kept open between requests. A client asks a registry each time it plans a chain,
    and opening a connection (TCP, the websocket upgrade, `hello`) costs more than the query itself; a registry
    holds an idle connection for a few KiB. Each request takes an idle connection of its own, or opens one, so
    concurrent requests never share one; a pooled connection that fails (the registry restarted while it was
    idle) is dropped and the request asked once more, on a new one."""

    def __init__(self, credentials: Credentials, agent: str = "swarm-client", max_idle: int = MAX_IDLE_PER_REGISTRY):
        self.credentials = credentials
        self.agent = agent
        self.max_idle = max_idle
        self._idle: dict[str, list[ClientConnection]] = {}

    async def request(self, url: str, message: BaseModel, expect: type[ReplyT]) -> ReplyT:
        """`message` to the registry at `url` and its reply; `PeerUnreachableError` when it cannot be had."""
        while True:
            idle = self._idle.get(url)
            pooled = bool(idle)
            connection = idle.pop() if idle else await self._open(url)
            try:
                reply = await request(connection, message, expect, timeout=REGISTRY_TIMEOUT, peer=url)
            except PeerUnreachableError:
                connection.transport.abort()
                if pooled:
                    continue  # it died while idle: a new connection decides
                raise
            except RemoteError:
                self._keep(url, connection)  # an error frame answers this request; the connection is sound
                raise
            except BaseException:  # cancelled or a reply out of protocol: the connection's next frame is unknown
                connection.transport.abort()
                raise
            self._keep(url, connection)
            return reply

    async def _open(self, url: str) -> ClientConnection:
        connection, _ = await open_connection(url, self.credentials, agent=self.agent, timeout=REGISTRY_TIMEOUT)
        return connection

    def _keep(self, url: str, connection: ClientConnection) -> None:
        idle = self._idle.setdefault(url, [])
        if len(idle) < self.max_idle:
            idle.append(connection)
        else:
            connection.transport.close()

    async def close(self) -> None:
        idle, self._idle = [c for connections in self._idle.values() for c in connections], {}
        await asyncio.gather(*(connection.close() for connection in idle), return_exceptions=True)


async def fetch_peers(
    registries: list[str],
    model: str | None,
    credentials: Credentials,
    model_id: str | None = None,
    route: RouteNeeds | None = None,
    pool: RegistryPool | None = None,
    address: str | None = None,
) -> list[PeerInfo]:
    """Live peers (of `model`, or all; with `model_id`, only those serving that checkpoint), or with `route` only
    the candidates a chain needs (`Query.per_layer`), from the first registry that answers. A registry that says
    it is `warming` (just restarted) is asked only when no other answers. A full listing comes a page at a time
    (`Query.after`), from one registry. `pool`: connections to reuse (and keep for next time); without one, the
    query's connections are closed when it is answered. `address`: only the peers announcing that address
    (`Query.address`)."""
    own_pool = pool is None
    pool = RegistryPool(credentials) if pool is None else pool
    failures = []
    warming: list[PeerInfo] | None = None
    fields = route.query_fields() if route else {}
    query = Query.trusted(type="query", model=model, model_id=model_id, address=address, **fields)
    try:
        for url in registries:
            try:
                view = await pool.request(url, query, SwarmView)
                peers = list(view.peers)
                while view.more and view.peers:  # a full listing, page after page
                    following = query.model_copy(update={"after": view.peers[-1].peer_id})
                    view = await pool.request(url, following, SwarmView)
                    peers += view.peers
            except PeerUnreachableError as exc:
                failures.append(str(exc))
                continue
            if not view.warming:
                return peers
            warming = peers if warming is None else warming
    finally:
        if own_pool:
            await pool.close()
    if warming is not None:
        return warming
    raise RegistryUnavailableError(
        "no registry answered: " + "; ".join(failures) + ". Start one with `swarm-registry` or pass --registry URL"
    )


@dataclass(frozen=True)
class RouteNeeds:
    """What a route query asks for: `per_layer` candidates for each layer, with `cache_tokens` free first,
    without the peers in `exclude` (at most `MAX_EXCLUDED` of them are sent)."""

    per_layer: int = ROUTE_CANDIDATES
    cache_tokens: int = 0
    exclude: frozenset[str] = frozenset()

    def covers(self, other: RouteNeeds) -> bool:
        """Whether an answer to these needs holds every candidate `other` asks for (the client leaves out the
        extra exclusions itself)."""
        same_ask = (self.per_layer, self.cache_tokens) == (other.per_layer, other.cache_tokens)
        return same_ask and self.exclude <= other.exclude

    def query_fields(self) -> dict[str, object]:
        return {
            "per_layer": self.per_layer,
            "cache_tokens": self.cache_tokens,
            "exclude": sorted(self.exclude)[:MAX_EXCLUDED],
        }


async def report_peer(registries: list[str], peer_id: str, reason: str, credentials: Credentials) -> None:
    """Tell every registry that `peer_id` was caught lying (best effort: a report that fails is logged)."""
    for url in registries:
        try:
            connection, _ = await open_connection(url, credentials, agent="swarm-client", timeout=REGISTRY_TIMEOUT)
            async with connection:
                message = Report(peer_id=peer_id, reason=reason[:512])
                await request(connection, message, Ack, timeout=REGISTRY_TIMEOUT, peer=url)
        except (PeerUnreachableError, ProtocolError, RemoteError) as exc:
            log.warning("could not report peer %s to %s: %s", peer_id, url, exc)
