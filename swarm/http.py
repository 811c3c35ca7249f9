"""Plain HTTP answers on a websocket port: registries serve their dashboard, every process `/metrics`."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

Route = Callable[[], tuple[str, bytes]]
"""Produces (content type, body) for one path."""


def response(status: HTTPStatus, content_type: str, body: bytes) -> Response:
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    )
    return Response(status.value, status.phrase, headers, body)


def http_router(routes: dict[str, Route]) -> Callable[[ServerConnection, Request], Response | None]:
    """A websockets `process_request` hook: websocket upgrades pass, GETs of known paths are answered."""

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        route = routes.get(request.path.split("?", 1)[0])
        if route is None:
            return response(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")
        content_type, body = route()
        return response(HTTPStatus.OK, content_type, body)

    return process_request


PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST
