"""Finding a chain of peers that covers a model, from any registry that answers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from swarm.errors import MissingLayersError, PeerUnreachableError, RegistryUnavailableError
from swarm.protocol import PeerInfo, Query, SwarmView
from swarm.routing import Link, missing_ranges, plan_route
from swarm.transport import open_connection, request

log = logging.getLogger("swarm.client")

REGISTRY_TIMEOUT = 5.0


async def fetch_peers(registries: list[str], model: str | None, token: str | None) -> list[PeerInfo]:
    """Live peers (of `model`, or all) from the first registry that answers."""
    failures = []
    for url in registries:
        try:
            connection, _ = await open_connection(url, token, agent="swarm-client", timeout=REGISTRY_TIMEOUT)
            async with connection:
                view = await request(connection, Query(model=model), SwarmView, timeout=REGISTRY_TIMEOUT, peer=url)
            return view.peers
        except PeerUnreachableError as exc:
            failures.append(str(exc))
    raise RegistryUnavailableError(
        "no registry answered: " + "; ".join(failures) + ". Start one with `swarm-registry` or pass --registry URL"
    )


@dataclass
class ChainPlanner:
    """Plans chains over one model's layers from the registries' current view."""

    registries: list[str]
    model_name: str
    num_layers: int
    token: str | None = None

    async def plan(self, cache_tokens_needed: int = 0, banned: frozenset[str] = frozenset()) -> list[Link]:
        peers = await fetch_peers(self.registries, self.model_name, self.token)
        peers = [peer for peer in peers if peer.num_layers == self.num_layers]
        chain = plan_route(peers, self.num_layers, banned=banned, cache_tokens_needed=cache_tokens_needed)
        if chain is None:
            usable = [peer for peer in peers if peer.peer_id not in banned]
            raise MissingLayersError(self.model_name, self.num_layers, missing_ranges(usable, self.num_layers))
        log.debug("chain for %s: %s", self.model_name, describe_chain(chain))
        return chain


def describe_chain(chain: list[Link]) -> str:
    return " -> ".join(f"{link.peer.address} [{link.start}:{link.end})" for link in chain)

