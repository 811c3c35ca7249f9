"""Asking registries what the swarm serves: the one query clients and nodes (`--layers auto`) share."""

from __future__ import annotations

from swarm.errors import PeerUnreachableError, RegistryUnavailableError
from swarm.protocol import PeerInfo, Query, SwarmView
from swarm.transport import Credentials, open_connection, request

REGISTRY_TIMEOUT = 5.0


async def fetch_peers(registries: list[str], model: str | None, credentials: Credentials) -> list[PeerInfo]:
    """Live peers (of `model`, or all) from the first registry that answers."""
    failures = []
    for url in registries:
        try:
            connection, _ = await open_connection(url, credentials, agent="swarm-client", timeout=REGISTRY_TIMEOUT)
            async with connection:
                view = await request(connection, Query(model=model), SwarmView, timeout=REGISTRY_TIMEOUT, peer=url)
            return view.peers
        except PeerUnreachableError as exc:
            failures.append(str(exc))
    raise RegistryUnavailableError(
        "no registry answered: " + "; ".join(failures) + ". Start one with `swarm-registry` or pass --registry URL"
    )
