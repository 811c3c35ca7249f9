"""The handshake: a client speaks the newest protocol version its peer speaks, and is told clearly when none."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from swarm import transport
from swarm.errors import ErrorCode, ProtocolError, RemoteError
from swarm.protocol import PROTOCOL_VERSION, ForwardResult, Hello, Welcome, WireTensor, decode_message, encode_message
from swarm.transport import (
    HELLO_MAX_BYTES,
    check_hello,
    error_frame,
    limit_frames,
    open_connection,
    receive_hello,
    send,
)


async def handshake_with(speaks: tuple[int, ...]) -> tuple[int, list[int]]:
    """Connect to a server that speaks only `speaks` (as a server of an older release would answer); returns
    the version the connection ended up in and every version the client offered."""
    offered: list[int] = []

    async def handle(connection: ServerConnection) -> None:
        hello = decode_message(await connection.recv())
        assert isinstance(hello, Hello)
        offered.append(hello.version)
        if hello.version not in speaks:
            spoken = ", ".join(map(str, speaks))
            message = f"protocol version {hello.version} is not supported; this peer speaks {spoken}"
            await send(connection, error_frame(ProtocolError(ErrorCode.UNSUPPORTED_VERSION, message)))
            return
        await send(connection, Welcome(version=hello.version))
        await connection.wait_closed()

    async with serve(handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        connection, welcome = await open_connection(f"ws://127.0.0.1:{port}", timeout=5)
        await connection.close()
    return welcome.version, offered


def test_a_client_speaks_the_newest_version_first() -> None:
    assert asyncio.run(handshake_with((PROTOCOL_VERSION,))) == (PROTOCOL_VERSION, [PROTOCOL_VERSION])


def test_a_client_that_speaks_several_versions_falls_back_for_an_older_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "SUPPORTED_VERSIONS", (PROTOCOL_VERSION - 1, PROTOCOL_VERSION))
    older = PROTOCOL_VERSION - 1
    assert asyncio.run(handshake_with((older,))) == (older, [PROTOCOL_VERSION, older])


def test_a_peer_that_speaks_no_version_of_ours_is_refused_with_its_reason() -> None:
    with pytest.raises(RemoteError, match=f"protocol version {PROTOCOL_VERSION} is not supported") as refused:
        asyncio.run(handshake_with((7,)))
    assert refused.value.code is ErrorCode.UNSUPPORTED_VERSION


def test_only_a_version_refusal_makes_a_client_try_an_older_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other error in answer to `hello` (here: a wrong token) is final."""
    monkeypatch.setattr(transport, "SUPPORTED_VERSIONS", (PROTOCOL_VERSION - 1, PROTOCOL_VERSION))

    async def refuse(connection: ServerConnection) -> None:
        decode_message(await connection.recv())
        await send(connection, error_frame(ProtocolError(ErrorCode.UNAUTHORIZED, "wrong token")))

    async def connect() -> None:
        async with serve(refuse, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            await open_connection(f"ws://127.0.0.1:{port}", timeout=5)

    with pytest.raises(RemoteError) as refused:
        asyncio.run(connect())
    assert refused.value.code is ErrorCode.UNAUTHORIZED and not refused.value.retryable


def test_servers_answer_in_the_version_they_were_greeted_in_and_refuse_older_ones() -> None:
    assert check_hello(Hello(version=PROTOCOL_VERSION), None) == PROTOCOL_VERSION
    with pytest.raises(ProtocolError) as refused:
        check_hello(Hello(version=2), None)
    assert refused.value.code is ErrorCode.UNSUPPORTED_VERSION and refused.value.code.retryable
    assert refused.value.message.startswith("protocol version 2 is not supported")


async def greeter(connection: ServerConnection, timeout: float = 5.0) -> None:
    """A server's handshake: the hello through `receive_hello`, then frames of up to 1 MiB, each echoed."""
    try:
        version = await receive_hello(connection, "secret", timeout=timeout)
    except ProtocolError as exc:
        await send(connection, error_frame(exc))
        return
    limit_frames(connection, 2**20)
    await send(connection, Welcome(version=version))
    async for frame in connection:
        await connection.send(frame)


def converse(frames: list[bytes], timeout: float = 5.0, served_max: int = 2 * HELLO_MAX_BYTES) -> list[object]:
    """Connect to `greeter` (served with websockets' `max_size=served_max`), send `frames`, and return what came
    back: messages, then how the connection ended (a `ConnectionClosed`, with its close code) if it did."""

    async def run() -> list[object]:
        answers: list[object] = []
        async with serve(lambda c: greeter(c, timeout), "127.0.0.1", 0, max_size=served_max) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", max_size=None) as connection:
                await asyncio.sleep(0.1)  # the server's handler is running
                try:
                    for frame in frames:  # each answered before the next is sent, as clients do with hello
                        await connection.send(frame)
                        answers.append(decode_message(await asyncio.wait_for(connection.recv(), 10)))
                    while True:
                        answers.append(decode_message(await asyncio.wait_for(connection.recv(), 2)))
                except websockets.ConnectionClosed as closed:
                    answers.append(closed)
                except TimeoutError:
                    pass
        return answers

    return asyncio.run(run())


def hello(token: str | None = "secret") -> bytes:
    return encode_message(Hello(version=PROTOCOL_VERSION, token=token))


def test_a_connection_that_never_says_hello_is_told_so_and_closed() -> None:
    began = time.monotonic()
    refusal, closed = converse([], timeout=0.3)
    assert refusal.code is ErrorCode.BAD_REQUEST and "hello" in refusal.message
    assert isinstance(closed, websockets.ConnectionClosed) and time.monotonic() - began < 3


@pytest.mark.parametrize("served_max", [2 * HELLO_MAX_BYTES, 2**26], ids=["served small", "served large"])
def test_a_first_frame_above_the_hello_limit_is_refused_and_one_above_twice_it_closes_the_connection_unread(
    served_max: int,
) -> None:
    """Nothing bigger than a hello is unpacked, nor twice that read, before the peer has said hello with the token."""
    refusal, closed = converse([b"\x90" * (HELLO_MAX_BYTES + 1)], served_max=served_max)
    assert refusal.code is ErrorCode.TOO_LARGE and isinstance(closed, websockets.ConnectionClosed)
    (closed,) = converse([b"\x90" * (2 * HELLO_MAX_BYTES + 1)], served_max=served_max)
    assert isinstance(closed, websockets.ConnectionClosed) and closed.rcvd.code == 1009  # message too big
    wrong, closed = converse([hello("wrong")], served_max=served_max)
    assert wrong.code is ErrorCode.UNAUTHORIZED and isinstance(closed, websockets.ConnectionClosed)


def test_after_the_hello_the_connection_takes_frames_up_to_the_raised_limit() -> None:
    tensor = ForwardResult(hidden=WireTensor.from_torch(torch.zeros(1, 100, 1000)))
    welcome, echoed, *_ = converse([hello(), encode_message(tensor)])
    assert welcome.type == "welcome" and echoed == tensor
