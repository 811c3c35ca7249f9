"""Talking to registries from a client or a node: the route query every one of them asks, and reports of peers
caught lying."""

from __future__ import annotations

import logging

from swarm.errors import PeerUnreachableError, ProtocolError, RegistryUnavailableError, RemoteError
from swarm.protocol import Ack, PeerInfo, Query, Report, SwarmView
from swarm.transport import Credentials, open_connection, request

log = logging.getLogger("swarm.client")

REGISTRY_TIMEOUT = 5.0


async def fetch_peers(
    registries: list[str], model: str | None, credentials: Credentials, model_id: str | None = None
) -> list[PeerInfo]:
    """Live peers (of `model`, or all; with `model_id`, only those serving that checkpoint) from the first
    registry that answers."""
    failures = []
    query = Query.trusted(type="query", model=model, model_id=model_id)
    for url in registries:
        try:
            connection, _ = await open_connection(url, credentials, agent="swarm-client", timeout=REGISTRY_TIMEOUT)
            async with connection:
                view = await request(connection, query, SwarmView, timeout=REGISTRY_TIMEOUT, peer=url)
            return view.peers
        except PeerUnreachableError as exc:
            failures.append(str(exc))
    raise RegistryUnavailableError(
        "no registry answered: " + "; ".join(failures) + ". Start one with `swarm-registry` or pass --registry URL"
    )


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
