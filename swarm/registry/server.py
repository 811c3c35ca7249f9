"""`swarm-registry`: soft state of who serves which layers, plus the dashboard on the same port.

Websocket clients speak the protocol (nodes announce, clients query); plain HTTP GETs get the
dashboard (`/`), its data (`/api/v1/state`), metrics (`/metrics`) and a liveness probe (`/healthz`),
all behind the swarm's token when it has one.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import ssl
import time
from collections.abc import Hashable
from importlib import resources

from swarm.errors import ErrorCode, ProtocolError
from swarm.http import PROMETHEUS_CONTENT_TYPE, CachedBody, HttpPages, Route, http_pages
from swarm.protocol import Ack, Announce, Leave, Query, Report, SwarmView
from swarm.registry.connections import RegistryConnection, listen
from swarm.registry.metrics import render
from swarm.registry.settings import RegistrySettings
from swarm.registry.state import RegistryState, StateView, state_view

log = logging.getLogger("swarm.registry")

HELLO_TIMEOUT_SECONDS = 5.0
"""A connection that has not said `hello` by then is closed: idle sockets cost the registry, not the caller."""
PAGE_MAX_AGE_SECONDS = 1.0
"""The state page and metrics are rebuilt at most this often, however often they are asked for."""


class Registry:
    def __init__(
        self,
        token: str | None = None,
        state: RegistryState | None = None,
        hello_timeout: float = HELLO_TIMEOUT_SECONDS,
        warmup: float = 0.0,
    ) -> None:
        self.token = token
        self.state = state or RegistryState()
        self.hello_timeout = hello_timeout
        self.warm_at = time.monotonic() + warmup
        """Until then, answers to queries say `warming`: nodes may not all have announced to this process yet."""
        self.connections: set[RegistryConnection] = set()
        """Open connections (`swarm.registry.connections`), closed when the server stops."""
        self.pages: set[asyncio.Task[None]] = set()
        """HTTP pages being answered."""

    def answer(self, message: object, owner: Hashable, reporter: str = "") -> Ack | SwarmView:
        """Names peers sent are logged with %r: quoted and escaped, they cannot forge a log line."""
        now = time.monotonic()
        if isinstance(message, Announce):
            info = message.peer
            if self.state.announce(info, message.ttl, now, owner):
                where = (info.start, info.end, info.address)
                log.info("peer %r announced %r layers [%d, %d) at %r", info.peer_id, info.model, *where)
            return Ack()
        if isinstance(message, Leave):
            if self.state.leave(message.peer_id, now, owner):
                log.info("peer %r left", message.peer_id)
            return Ack()
        if isinstance(message, Query):
            more = False
            if message.address is not None:
                peers = self.state.live_at(now, message.address, message.model, message.model_id)
            elif message.per_layer is None:
                peers, more = self.state.live_page(now, message.model, message.model_id, message.after, message.limit)
            else:
                peers = self.state.route_candidates(
                    now, message.model, message.model_id, message.per_layer, message.cache_tokens, message.exclude
                )
            return SwarmView.trusted(peers=peers, warming=now < self.warm_at, more=more)
        if isinstance(message, Report):
            if self.state.report(message.peer_id, reporter):
                log.warning("peer %r is left out of queries: reported by clients (%r)", message.peer_id, message.reason)
            else:
                log.info("peer %r reported by %r: %r", message.peer_id, reporter, message.reason)
            return Ack()
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"a registry does not accept {getattr(message, 'type', '?')!r} messages"
        )

    def http_pages(self) -> HttpPages:
        """Answers to plain HTTP requests on the websocket port, behind the token in a private swarm; the dashboard
        page also takes it as `?token=`, for a browser."""
        return http_pages(self.http_routes(), self.token, token_in_query=("/", "/index.html"))

    def http_routes(self) -> dict[str, Route]:
        """Plain HTTP on the websocket port: the dashboard, its JSON, metrics and a liveness probe. The JSON and
        the metrics are built from a copy of the state, in a thread, at most once a second."""
        page = resources.files("swarm.registry").joinpath("static/dashboard.html").read_bytes()
        routes: dict[str, Route] = {
            "/": lambda: ("text/html; charset=utf-8", page),
            "/api/v1/state": CachedBody(self._view, _state_json, PAGE_MAX_AGE_SECONDS),
            "/metrics": CachedBody(self._view, _metrics_text, PAGE_MAX_AGE_SECONDS),
            "/healthz": lambda: ("text/plain; charset=utf-8", b"ok\n"),
        }
        routes["/index.html"] = routes["/"]
        return routes

    def _view(self) -> StateView:
        return self.state.view(time.monotonic())


def _state_json(view: StateView) -> tuple[str, bytes]:
    return "application/json", json.dumps(state_view(view, time.monotonic())).encode()


def _metrics_text(view: StateView) -> tuple[str, bytes]:
    return PROMETHEUS_CONTENT_TYPE, render(view)


async def serve(settings: RegistrySettings, ssl_context: ssl.SSLContext | None = None) -> None:
    state = RegistryState(
        max_peers=settings.max_peers, max_models=settings.max_models, reports_to_exclude=settings.reports_to_exclude
    )
    registry = Registry(settings.token, state, warmup=settings.warmup)
    async with listen(registry, settings.host, settings.port, ssl_context) as server:
        settle_garbage_collector()
        bound = server.sockets[0].getsockname()[1]
        ws, http = ("wss", "https") if ssl_context else ("ws", "http")
        host = settings.host
        log.info("registry listening on %s://%s:%d (dashboard: %s://%s:%d/)", ws, host, bound, http, host, bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()


def settle_garbage_collector() -> None:
    """Move what startup built (modules, pydantic's validators: ~37,000 objects) out of the collector's sight: a full
    collection with 10,000 peers then takes 12 ms instead of 28 (measured). Nothing else is tuned: a heartbeat that
    changes nothing keeps the peer's old `PeerInfo`, so the steady state creates no long-lived objects and the
    collector took 0.0% of 40,000 announces' time with its default thresholds."""
    gc.collect()
    gc.freeze()
