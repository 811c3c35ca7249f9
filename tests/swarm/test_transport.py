"""The handshake: a client speaks the newest protocol version its peer speaks, and is told clearly when none."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.server import ServerConnection, serve

from swarm import transport
from swarm.errors import ErrorCode, ProtocolError, RemoteError
from swarm.protocol import PROTOCOL_VERSION, Hello, Welcome, decode_message
from swarm.transport import check_hello, error_frame, open_connection, send


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
