"""`RegistryPool`: a client's queries reuse connections to a registry, never share one at once, and survive the
registry restarting between them."""

from __future__ import annotations

import asyncio
import contextlib
import time

from swarm.protocol import Query, SwarmView
from swarm.registry.client import RegistryPool, fetch_peers
from swarm.registry.server import Registry, listen
from swarm.transport import Credentials
from tests.swarm.test_routing import peer


def test_sequential_queries_reuse_one_connection_and_concurrent_ones_take_their_own() -> None:
    async def scenario() -> tuple[int, int, list[int]]:
        registry = Registry()
        registry.state.announce(peer("a", 0, 8), ttl=30.0, now=asyncio.get_running_loop().time())
        async with listen(registry, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            pool = RegistryPool(Credentials())
            for _ in range(5):
                await fetch_peers([url], "m", Credentials(), pool=pool)
            sequential = len(registry.connections)
            views = await asyncio.gather(*(pool.request(url, Query(), SwarmView) for _ in range(3)))
            concurrent = len(registry.connections)
            await pool.close()
            await asyncio.sleep(0.05)
            return sequential, concurrent, [len(view.peers) for view in views] + [len(registry.connections)]

    assert asyncio.run(scenario()) == (1, 3, [1, 1, 1, 0])


def test_a_query_after_the_registry_restarted_goes_out_on_a_new_connection() -> None:
    async def scenario() -> list[str]:
        pool = RegistryPool(Credentials())
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(listen(Registry(), "127.0.0.1", 0))
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}"
            await pool.request(url, Query(), SwarmView)  # pooled now
        restarted = Registry()
        restarted.state.announce(peer("b", 0, 8), ttl=30.0, now=asyncio.get_running_loop().time())
        async with listen(restarted, "127.0.0.1", port):
            view = await pool.request(url, Query(), SwarmView)
            await pool.close()
        return [p.peer_id for p in view.peers]

    assert asyncio.run(scenario()) == ["b"]


def test_a_full_listing_comes_by_pages_whatever_the_swarms_size() -> None:
    """10,000 peers in one reply would be 2.3 MB and more msgpack values than any reader accepts: a listing comes
    1,000 peers a page, and `fetch_peers` follows the pages."""
    from swarm.protocol import MAX_PAGE_PEERS

    registry = Registry()
    now = time.monotonic()
    total = 2 * MAX_PAGE_PEERS + 17
    for index in range(total):
        registry.state.announce(peer(f"p{index:05d}", 0, 8), ttl=60.0, now=now, owner=index)

    async def scenario() -> tuple[list[str], int, bool]:
        async with listen(registry, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            listed = await fetch_peers([url], "m", Credentials())
            pool = RegistryPool(Credentials())
            first = await pool.request(url, Query(model="m", limit=10), SwarmView)
            await pool.close()
        return [p.peer_id for p in listed], len(first.peers), first.more

    listed, first_page, more = asyncio.run(scenario())
    assert listed == [f"p{index:05d}" for index in range(total)]
    assert (first_page, more) == (10, True)


def test_a_query_by_address_answers_only_the_peers_there() -> None:
    """What a node asks before it forwards a step: one small answer, whatever the swarm's size."""
    registry = Registry()
    now = time.monotonic()
    for index in range(500):
        registry.state.announce(peer(f"p{index:03d}", 0, 8), ttl=60.0, now=now, owner=index)

    async def scenario() -> tuple[list[str], list[str]]:
        async with listen(registry, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            there = await fetch_peers([url], "m", Credentials(), address=peer("p123", 0, 8).address)
            nowhere = await fetch_peers([url], "m", Credentials(), address="ws://nowhere:1")
        return [p.peer_id for p in there], [p.peer_id for p in nowhere]

    assert asyncio.run(scenario()) == (["p123"], [])
