"""The registry's connections: websockets without a task, a queue or a timer per connection.

A registry holds one connection per node (and per registry it announces to), thousands of them, each carrying a
small frame every few seconds. websockets' asyncio server gives every connection a handler task, a keepalive
task, a message assembler and the opening handshake's request and response for its whole life: about 16 KiB of
resident memory each (measured: 3,000 idle connections, 46 MiB). Here each connection is one `asyncio.Protocol`
around websockets' own sans-I/O `ServerProtocol` (the same framing, handshake and close rules, no I/O of its own):
a frame is answered inside `data_received`, with no task switch before the answer, and a connection costs its
transport, its parser and this object.

Dead sockets are found by TCP keepalive (the kernel's probes, no Python work) instead of websocket pings: a
node's heartbeats already tell the registry it is alive, and a silent one expires from the state either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from swarm.errors import ProtocolError
from swarm.http import PLAIN_TEXT, HttpPages, response
from swarm.protocol import Welcome, decode_message, encode_message
from swarm.transport import check_hello, error_frame

if TYPE_CHECKING:
    from swarm.registry.server import Registry

log = logging.getLogger("swarm.registry")

MAX_MESSAGE_BYTES = 1 * 2**20
MAX_HELLO_BYTES = 64 * 2**10
CLOSE_TIMEOUT_SECONDS = 5.0
"""After the registry's close frame, how long the other side has to close the TCP connection before it is cut."""
KEEPALIVE_IDLE_SECONDS = 60
"""TCP keepalive: a socket silent this long gets a probe every 20 s; three unanswered probes close it."""


class RegistryConnection(asyncio.Protocol):
    """One client's or node's connection: the websocket opening handshake (or a plain HTTP page), then `hello`,
    then every frame answered in order by `Registry.answer`."""

    def __init__(self, registry: Registry, http: HttpPages, owner: int, hello_timeout: float) -> None:
        self.registry = registry
        self.http = http
        self.owner = owner
        """What the registry's state knows this connection by (who may change the peers it announced)."""
        self.hello_timeout = hello_timeout
        self.protocol = ServerProtocol(max_size=2 * MAX_MESSAGE_BYTES)  # frames over the message limit get `too_large`
        self.transport: asyncio.Transport | None = None
        self.version: int | None = None
        self.host = ""
        self._hello_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._fragments: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports do not subclass asyncio's)
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if peer else ""
        _keep_alive(transport.get_extra_info("socket"))
        self._hello_timer = asyncio.get_running_loop().call_later(self.hello_timeout, self._silent)
        self.registry.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        self._handle_events()

    def eof_received(self) -> bool:
        self.protocol.receive_eof()
        self._handle_events()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._hello_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self.registry.connections.discard(self)
        self.registry.state.disconnect(self.owner, time.monotonic())  # the node's link dropped: most likely gone

    def pause_writing(self) -> None:
        """A reader that does not read its answers gets no more of them answered until it does."""
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def close(self, code: CloseCode = CloseCode.NORMAL_CLOSURE) -> None:
        """Start the closing handshake (the registry is stopping, or a connection broke the rules)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code)
            self._flush()
        elif self.transport is not None:
            self.transport.close()

    def _handle_events(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                self._opening(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def _opening(self, request: Request) -> None:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            task = asyncio.ensure_future(self._page(request))  # a page may be built in a thread (`CachedBody`)
            self.registry.pages.add(task)
            task.add_done_callback(self.registry.pages.discard)
            return
        self.protocol.send_response(self.protocol.accept(request))

    async def _page(self, request: Request) -> None:
        try:
            answer = await self.http(request)
        except Exception:  # a page that fails to build must not leave the request hanging
            log.exception("building %r failed", request.path)
            answer = response(HTTPStatus.INTERNAL_SERVER_ERROR, PLAIN_TEXT, b"internal error\n")
        if answer is not None and self.protocol.state is State.CONNECTING:
            self.protocol.send_response(answer)
            self._flush()

    def _frame(self, frame: Frame) -> None:
        if frame.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            return  # pings are answered and closes handled by the protocol itself
        self._fragments.append(frame.data)
        if not frame.fin:
            return  # the protocol bounds a fragmented message's total size like a whole one's
        message, self._fragments = b"".join(self._fragments), []
        if self.version is None:
            self._hello(message)
        else:
            self._answer(message)

    def _hello(self, frame: bytes) -> None:
        try:
            self.version = check_hello(decode_message(frame, MAX_HELLO_BYTES), self.registry.token)
        except ProtocolError as exc:
            self.protocol.send_binary(encode_message(error_frame(exc)))
            self.close()
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self.protocol.send_binary(encode_message(Welcome(version=self.version)))

    def _answer(self, frame: bytes) -> None:
        try:
            reply = self.registry.answer(decode_message(frame, MAX_MESSAGE_BYTES), self.owner, self.host)
        except ProtocolError as exc:
            reply = error_frame(exc)
        if self.protocol.state is State.OPEN:
            self.protocol.send_binary(encode_message(reply))

    def _silent(self) -> None:
        """No `hello` in time: idle sockets cost the registry, not the caller."""
        self._hello_timer = None
        if self.version is None:
            self.close()

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()
        if self._close_timer is None and self.protocol.close_expected():
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_SECONDS, self.transport.abort)


def _keep_alive(sock: socket.socket | None) -> None:
    """Let the kernel find peers that vanished without closing (TCP keepalive), where the platform allows."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS), ("TCP_KEEPINTVL", 20), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


@contextlib.asynccontextmanager
async def listen(
    registry: Registry, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[asyncio.Server]:
    """The registry's server while the block runs: websockets and, on the same port, its HTTP pages; in a private
    swarm the dashboard page also takes the token as `?token=`, for a browser. Leaving the block closes every
    connection (a node then reconnects to this registry's successor, or to the other registries)."""
    http = registry.http_pages()
    owners = itertools.count(1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RegistryConnection(registry, http, next(owners), registry.hello_timeout), host, port, ssl=ssl_context
    )
    try:
        yield server
    finally:
        server.close()
        for connection in list(registry.connections):
            connection.close(CloseCode.GOING_AWAY)
        for task in list(registry.pages):
            task.cancel()
        await asyncio.sleep(0)  # let the close frames go out
        for connection in list(registry.connections):
            if connection.transport is not None:
                connection.transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()
