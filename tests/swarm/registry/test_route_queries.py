"""Route queries over the wire: bounded replies, several registries giving a client the same chain, and a restarted
registry that says it may not know every peer yet."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

from swarm.client.core.planner import ChainPlanner
from swarm.protocol import Ack, Announce, PeerInfo, Query, SwarmView
from swarm.registry.client import RouteNeeds, fetch_peers
from swarm.registry.server import Registry, listen
from swarm.transport import Credentials, open_connection, request
from tests.swarm.registry.test_index import LAYERS, random_swarm


@contextlib.asynccontextmanager
async def running(registry: Registry) -> AsyncIterator[str]:
    async with listen(registry, "127.0.0.1", 0) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def announce_all(url: str, peers: list[PeerInfo], links: contextlib.AsyncExitStack) -> None:
    """Every peer over a connection of its own, as nodes do, open until `links` closes."""
    for info in peers:
        connection, _ = await open_connection(url, timeout=5)
        await links.enter_async_context(connection)
        await request(connection, Announce(peer=info, ttl=60.0), Ack, timeout=5)


def test_a_route_query_gets_a_bounded_reply_and_a_status_query_gets_every_peer() -> None:
    swarm = random_swarm(300)

    async def scenario() -> tuple[int, int]:
        async with running(Registry()) as url, contextlib.AsyncExitStack() as links:
            await announce_all(url, swarm, links)
            connection, _ = await open_connection(url, timeout=5)
            async with connection:
                bounded = await request(connection, Query(model="m", per_layer=2, cache_tokens=1), SwarmView, timeout=5)
                every = await request(connection, Query(model="m"), SwarmView, timeout=5)
            return len(bounded.peers), len(every.peers)

    bounded, every = asyncio.run(scenario())
    assert bounded <= 2 * LAYERS and every == 300


def test_several_registries_give_a_client_the_same_chain() -> None:
    swarm = random_swarm(400, seed=3)

    async def scenario() -> list[list[tuple[str, int, int]]]:
        async with running(Registry()) as first, running(Registry()) as second, contextlib.AsyncExitStack() as links:
            await announce_all(first, swarm, links)
            await announce_all(second, random.Random(4).sample(swarm, len(swarm)), links)  # heard in another order
            chains = []
            for url in (first, second):
                chain = await ChainPlanner([url], "m", LAYERS).plan(cache_tokens_needed=2048)
                chains.append([(link.peer.peer_id, link.start, link.end) for link in chain])
            return chains

    first, second = asyncio.run(scenario())
    assert first == second


def test_a_warming_registry_is_asked_only_when_no_other_answers() -> None:
    swarm = random_swarm(40, seed=5)

    async def scenario() -> tuple[int, int, bool]:
        async with (
            running(Registry(warmup=60.0)) as restarted,
            running(Registry()) as settled,
            contextlib.AsyncExitStack() as links,
        ):
            await announce_all(restarted, swarm[:10], links)  # only some nodes have reconnected so far
            await announce_all(settled, swarm, links)
            both = await fetch_peers([restarted, settled], "m", Credentials(), route=RouteNeeds())
            alone = await fetch_peers([restarted], "m", Credentials(), route=RouteNeeds())
            connection, _ = await open_connection(restarted, timeout=5)
            async with connection:
                view = await request(connection, Query(model="m"), SwarmView, timeout=5)
            return len({p.peer_id for p in both} - {p.peer_id for p in swarm[:10]}), len(alone), view.warming

    from_settled, alone, warming = asyncio.run(scenario())
    assert from_settled > 0  # the settled registry answered, with peers the restarted one has not heard of
    assert 0 < alone <= 10 and warming
