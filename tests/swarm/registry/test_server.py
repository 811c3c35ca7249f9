"""The registry's server in one process: who may change a peer's entry, how much one connection may announce, how
long a silent connection may stay, what reaches the log, and what its HTTP pages show and to whom."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import msgpack
import pytest
import websockets

from swarm.errors import ErrorCode, RemoteError
from swarm.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Announce,
    Hello,
    Leave,
    PeerInfo,
    Query,
    SwarmView,
    decode_message,
    encode_message,
)
from swarm.registry.server import Registry, listen
from swarm.registry.state import MAX_LISTED_PEERS
from swarm.transport import open_connection, request
from tests.swarm.test_routing import peer


@contextlib.asynccontextmanager
async def running(registry: Registry) -> AsyncIterator[str]:
    async with listen(registry, "127.0.0.1", 0) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def live(url: str) -> dict[str, str]:
    """peer_id -> address of every live peer, as a client sees them."""
    connection, _ = await open_connection(url, timeout=5)
    async with connection:
        view = await request(connection, Query(), SwarmView, timeout=5)
    return {p.peer_id: p.address for p in view.peers}


async def announce(connection: websockets.ClientConnection, info: PeerInfo) -> None:
    await request(connection, Announce(peer=info, ttl=30.0), Ack, timeout=5)


def hijacked(info: PeerInfo) -> PeerInfo:
    return info.model_copy(update={"address": "ws://attacker.example:1"})


def test_another_connection_cannot_take_over_a_live_peer_id() -> None:
    async def scenario() -> tuple[ErrorCode, dict[str, str]]:
        async with running(Registry()) as url:
            honest, _ = await open_connection(url, timeout=5)
            await announce(honest, peer("a", 0, 8))
            intruder, _ = await open_connection(url, timeout=5)
            with pytest.raises(RemoteError) as refused:
                await announce(intruder, hijacked(peer("a", 0, 8)))
            return refused.value.code, await live(url)

    code, peers = asyncio.run(scenario())
    assert code is ErrorCode.UNAUTHORIZED
    assert peers == {"a": "ws://127.0.0.1/a"}


def test_another_connection_cannot_make_a_live_peer_leave() -> None:
    async def scenario() -> tuple[list[ErrorCode], dict[str, str]]:
        async with running(Registry()) as url:
            honest, _ = await open_connection(url, timeout=5)
            await announce(honest, peer("a", 0, 8))
            intruder, _ = await open_connection(url, timeout=5)
            codes = []
            for _ in range(3):
                with pytest.raises(RemoteError) as refused:
                    await request(intruder, Leave(peer_id="a"), Ack, timeout=5)
                codes.append(refused.value.code)
            await announce(honest, peer("a", 0, 8))  # the owner's heartbeats carry on
            return codes, await live(url)

    codes, peers = asyncio.run(scenario())
    assert codes == [ErrorCode.UNAUTHORIZED] * 3
    assert peers == {"a": "ws://127.0.0.1/a"}


def test_a_peer_id_is_free_again_once_its_connection_closes_or_it_leaves() -> None:
    """A node whose registry link dropped reconnects and announces the same id on a new connection."""

    async def scenario() -> list[dict[str, str]]:
        async with running(Registry()) as url:
            first, _ = await open_connection(url, timeout=5)
            await announce(first, peer("a", 0, 8))
            await first.close()
            while "a" in await live(url):  # the registry notices the close
                await asyncio.sleep(0.01)
            second, _ = await open_connection(url, timeout=5)
            await announce(second, peer("a", 0, 8).model_copy(update={"address": "ws://moved:2"}))
            after_reconnect = await live(url)
            await request(second, Leave(peer_id="a"), Ack, timeout=5)
            third, _ = await open_connection(url, timeout=5)
            await announce(third, peer("a", 0, 8).model_copy(update={"address": "ws://moved:3"}))
            return [after_reconnect, await live(url)]

    assert asyncio.run(scenario()) == [{"a": "ws://moved:2"}, {"a": "ws://moved:3"}]


def test_one_connection_announces_at_most_eight_peers() -> None:
    async def scenario() -> tuple[ErrorCode, int]:
        async with running(Registry()) as url:
            connection, _ = await open_connection(url, timeout=5)
            for index in range(8):
                await announce(connection, peer(f"p{index}", 0, 8))
            with pytest.raises(RemoteError) as refused:
                await announce(connection, peer("p8", 0, 8))
            await announce(connection, peer("p3", 0, 8))  # its own peers' heartbeats still pass
            return refused.value.code, len(await live(url))

    assert asyncio.run(scenario()) == (ErrorCode.BAD_REQUEST, 8)


def test_a_connection_that_never_says_hello_is_closed() -> None:
    async def scenario() -> float:
        async with running(Registry(hello_timeout=0.3)) as url, websockets.connect(url) as silent:
            began = asyncio.get_running_loop().time()
            await asyncio.wait_for(silent.wait_closed(), timeout=5)
            return asyncio.get_running_loop().time() - began

    assert asyncio.run(scenario()) < 2.0


def test_a_first_frame_larger_than_a_hello_is_refused_as_too_large() -> None:
    async def scenario() -> str:
        async with running(Registry()) as url, websockets.connect(url) as connection:
            await connection.send(msgpack.packb({"type": "hello", "version": PROTOCOL_VERSION, "agent": "x" * 2**17}))
            return decode_message(await connection.recv()).code

    assert asyncio.run(scenario()) == ErrorCode.TOO_LARGE


def test_a_newline_in_an_announced_name_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    forged = "a\n2030-01-01 00:00:00,000 INFO swarm.registry: peer b left"
    honest = peer("a", 0, 8).model_dump()

    async def scenario() -> None:
        async with running(Registry()) as url, websockets.connect(url) as connection:
            await connection.send(encode_message(Hello(version=PROTOCOL_VERSION)))
            await connection.recv()
            for field in ("peer_id", "model", "address"):
                frame = {"type": "announce", "ttl": 30.0, "peer": honest | {field: forged}}
                await connection.send(msgpack.packb(frame))
                await connection.recv()

    with caplog.at_level(logging.DEBUG, logger="swarm.registry"):
        asyncio.run(scenario())
    assert not [record for record in caplog.records if "\n" in record.getMessage()]


async def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    def fetch() -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, b""

    return await asyncio.to_thread(fetch)


def test_the_state_page_lists_a_bounded_number_of_peers_and_metrics_count_them_all() -> None:
    registry = Registry()
    for index in range(MAX_LISTED_PEERS + 44):
        registry.state.announce(peer(f"p{index:03d}", 0, 8), ttl=30.0, now=time.monotonic())

    async def scenario() -> tuple[dict, str]:
        async with running(registry) as url:
            base = url.replace("ws://", "http://")
            state, metrics = await get(base + "/api/v1/state"), await get(base + "/metrics")
        return json.loads(state[1]), metrics[1].decode()

    state, metrics = asyncio.run(scenario())
    assert (len(state["peers"]), state["peers_unlisted"]) == (MAX_LISTED_PEERS, 44)
    assert state["models"][0]["peers"] == MAX_LISTED_PEERS + 44
    assert f'swarm_registry_peers{{state="online"}} {MAX_LISTED_PEERS + 44}.0' in metrics


def test_a_private_registry_shows_its_pages_only_with_the_token() -> None:
    pages = ("/", "/index.html", "/api/v1/state", "/metrics", "/healthz")

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        async with running(Registry(token="s3cret")) as url:
            base = url.replace("ws://", "http://")
            without = [(await get(base + path))[0] for path in pages]
            with_token = [(await get(base + path, "s3cret"))[0] for path in pages]
            in_query = [(await get(base + path + "?token=s3cret"))[0] for path in pages]
        return without, with_token, in_query

    without, with_token, in_query = asyncio.run(scenario())
    assert without == [401] * 5
    assert with_token == [200] * 5
    assert in_query == [200, 200, 401, 401, 401], "only the page a browser opens takes the token in its address"


def test_a_message_sent_in_fragments_is_answered_like_a_whole_one() -> None:
    async def scenario() -> tuple[int, str]:
        async with running(Registry()) as url, websockets.connect(url) as connection:
            hello = encode_message(Hello(version=PROTOCOL_VERSION))
            await connection.send([hello[:3], hello[3:]])  # an iterable goes out as fragments
            welcome = decode_message(await connection.recv())
            query = encode_message(Query())
            await connection.send([query[:1], query[1:2], query[2:]])
            return welcome.version, decode_message(await connection.recv()).type

    assert asyncio.run(scenario()) == (PROTOCOL_VERSION, "swarm_view")


def test_stopping_the_registry_closes_its_connections_as_going_away_and_the_kernel_watches_idle_ones() -> None:
    async def scenario() -> tuple[int | None, int]:
        registry = Registry()
        async with contextlib.AsyncExitStack() as stack:
            url = await stack.enter_async_context(running(registry))
            connection, _ = await open_connection(url, timeout=5)
            [held] = registry.connections
            keepalive = held.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        await asyncio.wait_for(connection.wait_closed(), timeout=5)
        return connection.close_code, keepalive

    code, keepalive = asyncio.run(scenario())
    assert code == 1001 and keepalive == 1
