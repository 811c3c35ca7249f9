"""Plain HTTP answers on a websocket port: registries serve their dashboard, every process `/metrics`.

In a private swarm (`--token`) every page needs the token, as `Authorization: Bearer TOKEN`; pages a browser
opens by hand may take it as `?token=` instead. Pages that cost something to build are built at most once a
second (`CachedBody`), off the event loop, so a flood of requests cannot starve the websockets on the port.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Generic, TypeVar
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

Body = tuple[str, bytes]
"""(content type, body) of one answer."""
Route = Callable[[], Body | Awaitable[Body]]
"""Produces one path's answer; may be a coroutine function."""

PLAIN_TEXT = "text/plain; charset=utf-8"


def response(status: HTTPStatus, content_type: str, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"), *extra]
    )
    return Response(status.value, status.phrase, headers, body)


HttpPages = Callable[[Request], Awaitable[Response | None]]
"""A plain HTTP request's answer, or None for a websocket upgrade (to let it through)."""


def http_router(
    routes: dict[str, Route], token: str | None = None, token_in_query: Collection[str] = ()
) -> Callable[[ServerConnection, Request], Awaitable[Response | None]]:
    """`http_pages` as a websockets `process_request` hook."""
    pages = http_pages(routes, token, token_in_query)

    async def process_request(connection: ServerConnection, request: Request) -> Response | None:
        return await pages(request)

    return process_request


def http_pages(routes: dict[str, Route], token: str | None = None, token_in_query: Collection[str] = ()) -> HttpPages:
    """Websocket upgrades pass (their first frame carries the token), GETs of known paths are answered. With
    `token`, a request without it gets 401; the paths in `token_in_query` also accept it as `?token=`."""

    async def answer(request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        url = urlsplit(request.path)
        route = routes.get(url.path)
        if route is None:
            return response(HTTPStatus.NOT_FOUND, PLAIN_TEXT, b"not found\n")
        if token and not _authorized(request, url.query if url.path in token_in_query else "", token):
            return response(
                HTTPStatus.UNAUTHORIZED,
                PLAIN_TEXT,
                b"this swarm is private: send Authorization: Bearer <token>\n",
                (("WWW-Authenticate", 'Bearer realm="swarm"'),),
            )
        body = route()
        content_type, payload = await body if inspect.isawaitable(body) else body
        return response(HTTPStatus.OK, content_type, payload)

    return answer


def _authorized(request: Request, query: str, token: str) -> bool:
    """The token from the Bearer header, or from the query when allowed; compared in constant time."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        given = next(iter(parse_qs(query).get("token", [])), "")
    return hmac.compare_digest(given.strip().encode(), token.encode())


SnapshotT = TypeVar("SnapshotT")


class CachedBody(Generic[SnapshotT]):
    """A route whose answer is built at most once per `max_age` seconds, in a worker thread: requests meanwhile
    get the last answer, and those that arrive while it is being built wait for that one build.

    `snapshot` runs on the event loop and must be cheap (copy what `build` needs); `build` runs in a thread of the
    route's own, so it never waits behind other work handed to the loop's default executor."""

    def __init__(
        self, snapshot: Callable[[], SnapshotT], build: Callable[[SnapshotT], Body], max_age: float = 1.0
    ) -> None:
        self.snapshot = snapshot
        self.build = build
        self.max_age = max_age
        self._body: Body | None = None
        self._built_at = float("-inf")
        self._building: asyncio.Future[Body] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cached-body")

    async def __call__(self) -> Body:
        if self._body is not None and time.monotonic() - self._built_at < self.max_age:
            return self._body
        if self._building is None:
            self._building = asyncio.ensure_future(self._rebuild())
        return await asyncio.shield(self._building)

    async def _rebuild(self) -> Body:
        try:
            began = time.monotonic()
            snapshot = self.snapshot()
            self._body = await asyncio.get_running_loop().run_in_executor(self._thread, self.build, snapshot)
            self._built_at = began
            return self._body
        finally:
            self._building = None


PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST
