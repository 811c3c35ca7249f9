"""`swarm-registry`: soft state of who serves which layers, plus the dashboard on the same port.

Websocket clients speak the protocol (nodes announce, clients query); plain HTTP GETs get the
dashboard (`/`), its data (`/api/v1/state`) and a liveness probe (`/healthz`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import time
from importlib import resources

import websockets
from websockets.asyncio.server import ServerConnection

from swarm.errors import ErrorCode, ProtocolError
from swarm.http import PROMETHEUS_CONTENT_TYPE, Route, http_router
from swarm.protocol import Ack, Announce, Leave, Query, SwarmView, Welcome, decode_message
from swarm.registry.metrics import registry_metrics, render
from swarm.registry.state import RegistryState
from swarm.transport import check_hello, error_frame, send

log = logging.getLogger("swarm.registry")

MAX_MESSAGE_BYTES = 1 * 2**20


class Registry:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.state = RegistryState()

    async def handle(self, connection: ServerConnection) -> None:
        announced: set[str] = set()
        try:
            try:
                version = check_hello(decode_message(await connection.recv(), MAX_MESSAGE_BYTES), self.token)
            except ProtocolError as exc:
                await send(connection, error_frame(exc))
                return
            await send(connection, Welcome(version=version))
            async for frame in connection:
                try:
                    reply = self._answer(decode_message(frame, MAX_MESSAGE_BYTES), announced)
                except ProtocolError as exc:
                    reply = error_frame(exc)
                await send(connection, reply)
        except websockets.ConnectionClosed:
            pass
        finally:
            now = time.monotonic()
            for peer_id in announced:  # the node's link dropped: it is most likely gone
                self.state.mark_gone(peer_id, now)

    def _answer(self, message: object, announced: set[str]) -> Ack | SwarmView:
        now = time.monotonic()
        if isinstance(message, Announce):
            if message.peer.peer_id not in announced:
                log.info(
                    "peer %s announced %s layers [%d, %d) at %s",
                    message.peer.peer_id,
                    message.peer.model,
                    message.peer.start,
                    message.peer.end,
                    message.peer.address,
                )
            self.state.announce(message.peer, message.ttl, now)
            announced.add(message.peer.peer_id)
            return Ack()
        if isinstance(message, Leave):
            self.state.mark_gone(message.peer_id, now)
            announced.discard(message.peer_id)
            log.info("peer %s left", message.peer_id)
            return Ack()
        if isinstance(message, Query):
            return SwarmView(peers=self.state.live_peers(now, message.model))
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"a registry does not accept {getattr(message, 'type', '?')!r} messages"
        )

    def http_routes(self) -> dict[str, Route]:
        """Plain HTTP on the websocket port: the dashboard, its JSON, metrics and a liveness probe."""
        metrics = registry_metrics(self.state)
        routes: dict[str, Route] = {
            "/": lambda: ("text/html; charset=utf-8", _dashboard_html()),
            "/api/v1/state": lambda: ("application/json", json.dumps(self.state.snapshot(time.monotonic())).encode()),
            "/metrics": lambda: (PROMETHEUS_CONTENT_TYPE, render(metrics)),
            "/healthz": lambda: ("text/plain; charset=utf-8", b"ok\n"),
        }
        routes["/index.html"] = routes["/"]
        return routes


def _dashboard_html() -> bytes:
    return resources.files("swarm.registry").joinpath("static/dashboard.html").read_bytes()


async def serve(host: str, port: int, token: str | None, ssl_context: ssl.SSLContext | None = None) -> None:
    registry = Registry(token)
    async with websockets.serve(
        registry.handle,
        host,
        port,
        process_request=http_router(registry.http_routes()),
        max_size=MAX_MESSAGE_BYTES * 2,
        compression=None,
        ssl=ssl_context,
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        ws, http = ("wss", "https") if ssl_context else ("ws", "http")
        log.info("registry listening on %s://%s:%d (dashboard: %s://%s:%d/)", ws, host, bound, http, host, bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
