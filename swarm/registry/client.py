"""Talking to registries from a client or a node: the route query every one of them asks, and reports of peers
caught lying."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from swarm.errors import PeerUnreachableError, ProtocolError, RegistryUnavailableError, RemoteError
from swarm.protocol import MAX_EXCLUDED, Ack, PeerInfo, Query, Report, SwarmView
from swarm.transport import Credentials, open_connection, request

log = logging.getLogger("swarm.client")

REGISTRY_TIMEOUT = 5.0
ROUTE_CANDIDATES = 4
"""Peers per layer a route query asks for: the best, and spares for a client whose first choices fail or are busy,
without asking again."""


async def fetch_peers(
    registries: list[str],
    model: str | None,
    credentials: Credentials,
    model_id: str | None = None,
    route: RouteNeeds | None = None,
) -> list[PeerInfo]:
    """Live peers (of `model`, or all; with `model_id`, only those serving that checkpoint), or with `route` only
    the candidates a chain needs (`Query.per_layer`), from the first registry that answers. A registry that says
    it is `warming` (just restarted) is asked only when no other answers."""
    failures = []
    warming: list[PeerInfo] | None = None
    query = Query.trusted(type="query", model=model, model_id=model_id, **(route.query_fields() if route else {}))
    for url in registries:
        try:
            connection, _ = await open_connection(url, credentials, agent="swarm-client", timeout=REGISTRY_TIMEOUT)
            async with connection:
                view = await request(connection, query, SwarmView, timeout=REGISTRY_TIMEOUT, peer=url)
        except PeerUnreachableError as exc:
            failures.append(str(exc))
            continue
        if not view.warming:
            return view.peers
        warming = view.peers if warming is None else warming
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
