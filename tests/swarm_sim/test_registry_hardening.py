"""A real registry process under abuse: a flood of dashboard requests, silent connections and oversized
announcements must not stop it answering the swarm."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import websockets

from swarm.client.local_swarm import LocalSwarm
from swarm.errors import RemoteError
from swarm.protocol import Ack, Announce, PeerInfo, Query, SwarmView, decode_message
from swarm.transport import open_connection, request

HELLO_TIMEOUT_SECONDS = 5.0
"""The registry's (`swarm.registry.server.HELLO_TIMEOUT_SECONDS`), repeated: this test runs against its process."""

MODELS = 160
"""More models than a registry keeps: the ones beyond its limit are refused with `busy`."""
LAYERS = 4096
PEERS_PER_CONNECTION = 8


def big_peer(model: int, index: int) -> PeerInfo:
    """A valid peer as large as the protocol allows: the model's every layer, long strings."""
    return PeerInfo(
        peer_id=f"{model:03d}-{index}-" + "p" * 100,
        address=f"ws://10.0.{model}.{index}:7001/" + "a" * 400,
        model=f"model-{model:03d}-" + "m" * 100,
        num_layers=LAYERS,
        start=index * (LAYERS // PEERS_PER_CONNECTION),
        end=(index + 1) * (LAYERS // PEERS_PER_CONNECTION),
        state="online",
        dtype="bfloat16",
        throughput=1000.0,
        cache_tokens_free=1000,
        cache_tokens_total=1000,
        version="v" * 64,
    )


def hammer(url: str, stop: threading.Event, sizes: list[int]) -> None:
    while not stop.is_set():
        try:
            sizes.append(len(urllib.request.urlopen(url, timeout=30).read()))
        except OSError:
            sizes.append(-1)


async def fill_and_measure(registry_url: str, state_url: str) -> tuple[list[float], list[int]]:
    """Announce MODELS x PEERS_PER_CONNECTION big peers (one connection per model, kept open), then time queries
    while four threads fetch the dashboard's state as fast as they can."""
    holders = []
    for model in range(MODELS):
        connection, _ = await open_connection(registry_url, timeout=10)
        holders.append(connection)
        for index in range(PEERS_PER_CONNECTION):
            try:
                await request(connection, Announce(peer=big_peer(model, index), ttl=600), Ack, timeout=10)
            except RemoteError as refused:
                assert refused.code == "busy"
    stop, sizes = threading.Event(), []
    threads = [threading.Thread(target=hammer, args=(state_url, stop, sizes)) for _ in range(4)]
    for thread in threads:
        thread.start()
    latencies = []
    try:
        client, _ = await open_connection(registry_url, timeout=10)
        async with client:
            await asyncio.sleep(1.0)  # let the flood build up
            for _ in range(30):
                began = time.perf_counter()
                view = await request(client, Query(model=big_peer(7, 0).model), SwarmView, timeout=30)
                latencies.append(time.perf_counter() - began)
                assert len(view.peers) == PEERS_PER_CONNECTION
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for connection in holders:
            await connection.close()
    return latencies, sizes


def test_queries_keep_answering_while_the_state_page_is_hammered(tmp_path: Path) -> None:
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_registry()
        state_url = f"http://127.0.0.1:{swarm.registry_port}/api/v1/state"
        latencies, sizes = asyncio.run(fill_and_measure(swarm.registry_url, state_url))
    assert sizes and -1 not in sizes
    assert max(sizes) < 2**20 + 2**19, "the state page is capped, whatever the peers announce"
    median, longest = statistics.median(latencies), max(latencies)
    assert median < 0.1 and longest < 2.0, f"queries waited {median:.2f} s (up to {longest:.2f} s) behind the pages"


async def silent_connections(registry_url: str, count: int, wait: float) -> tuple[int, list[str]]:
    """Open `count` websockets that never say hello; after `wait` seconds, how many are still open, and whether an
    honest client is still answered."""
    silent = [await websockets.connect(registry_url) for _ in range(count)]
    await asyncio.sleep(wait)
    still_open = sum(1 for connection in silent if connection.state is websockets.State.OPEN)
    for connection in silent:
        await connection.close()
    client, _ = await open_connection(registry_url, timeout=10)
    async with client:
        view = await request(client, Query(), SwarmView, timeout=10)
    return still_open, [p.peer_id for p in view.peers]


def test_connections_that_never_say_hello_are_closed(tmp_path: Path) -> None:
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_registry()
        still_open, peers = asyncio.run(silent_connections(swarm.registry_url, 200, HELLO_TIMEOUT_SECONDS + 3))
    assert still_open == 0
    assert peers == []


def oversized(index: int) -> dict[str, object]:
    return big_peer(index % MODELS, index % PEERS_PER_CONNECTION).model_dump() | {
        "peer_id": f"huge-{index}",
        "model": f"huge-{index}",
        "num_layers": 100_000,
        "start": 0,
        "end": 100_000,
    }


async def announce_oversized(registry_url: str, count: int) -> list[str]:
    """What the registry answers to `count` announces of a 100 000-layer model, eight per connection."""
    answers = []
    for first in range(0, count, PEERS_PER_CONNECTION):
        connection, _ = await open_connection(registry_url, timeout=10)
        async with connection:
            for index in range(first, min(first + PEERS_PER_CONNECTION, count)):
                await connection.send(msgpack.packb({"type": "announce", "ttl": 600.0, "peer": oversized(index)}))
                answers.append(decode_message(await connection.recv()).type)
    return answers


def test_announces_of_absurd_models_are_refused_and_the_state_page_stays_small(tmp_path: Path) -> None:
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_registry()
        answers = asyncio.run(announce_oversized(swarm.registry_url, 150))
        began = time.perf_counter()
        page = urllib.request.urlopen(f"http://127.0.0.1:{swarm.registry_port}/api/v1/state", timeout=60).read()
        took = time.perf_counter() - began
    assert answers == ["error"] * 150
    assert len(page) < 1000 and took < 1.0
