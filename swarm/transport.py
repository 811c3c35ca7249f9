"""Moving protocol messages over websockets: the thin I/O layer around `swarm.protocol`."""

from __future__ import annotations

import asyncio
import hmac
import ssl
from dataclasses import dataclass
from typing import TypeVar

import websockets
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection

from swarm.errors import ErrorCode, PeerUnreachableError, ProtocolError, RemoteError
from swarm.protocol import (
    SUPPORTED_VERSIONS,
    Error,
    Hello,
    Message,
    Welcome,
    decode_message,
    encode_message,
)

ReplyT = TypeVar("ReplyT", bound=BaseModel)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
CONNECT_TIMEOUT = 10.0
HELLO_MAX_BYTES = 64 * 1024
"""Largest first frame a server reads. A hello is a few hundred bytes (its token at most 1 KiB); nothing bigger is
read, let alone unpacked, before the peer has said hello (with the token, in a private swarm)."""
HELLO_TIMEOUT = 5.0
"""How long a server waits for the hello of a connection before closing it."""


async def send(connection: websockets.asyncio.connection.Connection, message: BaseModel) -> None:
    await connection.send(encode_message(message))


async def receive(connection: websockets.asyncio.connection.Connection, max_bytes: int | None = None) -> Message:
    return decode_message(await connection.recv(), max_bytes)


async def request(
    connection: ClientConnection,
    message: BaseModel,
    expect: type[ReplyT],
    timeout: float | None = None,
    peer: str = "",
) -> ReplyT:
    """Send one message and wait for its reply, turning error frames into `RemoteError`."""
    try:
        async with asyncio.timeout(timeout):
            await send(connection, message)
            reply = await receive(connection)
    except (websockets.ConnectionClosed, OSError) as exc:
        raise PeerUnreachableError(f"connection to {peer or 'peer'} lost: {exc}") from exc
    except TimeoutError:
        raise PeerUnreachableError(f"{peer or 'peer'} did not answer within {timeout} s") from None
    if isinstance(reply, Error):
        raise RemoteError(reply.code, reply.message, peer)
    if not isinstance(reply, expect):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"expected {expect.__name__} from {peer or 'peer'}, got {reply.type!r}"
        )
    return reply


@dataclass(frozen=True)
class Credentials:
    """What a client side needs to enter a private swarm: the shared token, and for `wss://`
    peers with a private certificate authority, its CA file."""

    token: str | None = None
    ca_file: str | None = None

    def ssl_context(self, url: str) -> ssl.SSLContext | None:
        if not url.startswith("wss://"):
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    def __repr__(self) -> str:  # never print the token
        return f"Credentials(token={'***' if self.token else None}, ca_file={self.ca_file!r})"


def server_ssl_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """TLS for a server given `--tls-cert/--tls-key` (both or neither)."""
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


async def open_connection(
    url: str,
    credentials: Credentials = Credentials(),
    agent: str = "",
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    timeout: float = CONNECT_TIMEOUT,
) -> tuple[ClientConnection, Welcome]:
    """Connect and exchange `hello`/`welcome` in the newest protocol version the peer speaks (`welcome.version`):
    a peer that refuses a version is asked again, on a new connection, in the next older one."""
    newest_first = sorted(SUPPORTED_VERSIONS, reverse=True)
    for version in newest_first:
        connection = await _connect(url, credentials, max_bytes, timeout)
        try:
            hello = Hello(version=version, token=credentials.token, agent=agent)
            return connection, await request(connection, hello, Welcome, timeout, url)
        except RemoteError as exc:
            await connection.close()
            if exc.code is not ErrorCode.UNSUPPORTED_VERSION or version == newest_first[-1]:
                raise
        except BaseException:
            await connection.close()
            raise
    raise AssertionError("unreachable: the last version's refusal is raised")


async def _connect(url: str, credentials: Credentials, max_bytes: int, timeout: float) -> ClientConnection:
    try:
        async with asyncio.timeout(timeout):
            return await websockets.connect(
                url, max_size=max_bytes, compression=None, open_timeout=timeout, ssl=credentials.ssl_context(url)
            )
    except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        raise PeerUnreachableError(f"cannot connect to {url}: {exc}") from exc


async def receive_hello(
    connection: websockets.asyncio.connection.Connection,
    token: str | None,
    timeout: float = HELLO_TIMEOUT,
    max_bytes: int = HELLO_MAX_BYTES,
) -> int:
    """Server side of the handshake: the first frame, read with a small size limit and a deadline, must be an
    acceptable `hello` (`check_hello`); returns its version, or raises `ProtocolError` to answer with.

    A first frame over `max_bytes` is `too_large`, and one over twice that closes the connection (1009) as soon as
    its header arrives, unread. A frame sent together with the websocket handshake may be parsed before this runs:
    serve with `max_size=2 * max_bytes`, and raise the limit with `limit_frames` once the hello is accepted."""
    limit_frames(connection, 2 * max_bytes)
    try:
        async with asyncio.timeout(timeout):
            frame = await connection.recv()
    except TimeoutError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"no hello within {timeout:g} s; closing") from None
    return check_hello(decode_message(frame, max_bytes), token)


def limit_frames(connection: websockets.asyncio.connection.Connection, max_bytes: int | None) -> None:
    """The largest message the connection accepts from now on; a larger one closes it (1009, message too big)."""
    protocol = connection.protocol
    if hasattr(protocol, "max_message_size"):  # websockets 15 and later
        protocol.max_message_size = max_bytes
    else:
        protocol.max_size = max_bytes


def check_hello(message: Message, token: str | None) -> int:
    """Server side of the handshake: version first, then the private swarm's token. Returns the version the
    connection speaks, which the server's `welcome` repeats."""
    if not isinstance(message, Hello):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"the first frame must be 'hello', got {message.type!r}")
    if message.version not in SUPPORTED_VERSIONS:
        spoken = ", ".join(str(version) for version in SUPPORTED_VERSIONS)
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {message.version} is not supported; this peer speaks {spoken}",
        )
    if token and not hmac.compare_digest((message.token or "").encode(), token.encode()):
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or wrong swarm token; pass --token or set SWARM_TOKEN")
    return message.version


def error_frame(exc: ProtocolError, session_id: str | None = None) -> Error:
    return Error(code=exc.code, message=exc.message[:4096], session_id=session_id, step_id=exc.step_id)
