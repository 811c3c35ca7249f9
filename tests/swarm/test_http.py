"""Plain HTTP on a websocket port: open without a token, 401 without it in a private swarm, and costly pages
built once a second off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

from websockets.asyncio.server import ServerConnection, serve

from swarm.http import CachedBody, Route, http_router

TOKEN = "s3cret"


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await asyncio.to_thread(fetch)


@contextlib.asynccontextmanager
async def serving(
    routes: dict[str, Route], token: str | None, token_in_query: tuple[str, ...] = ()
) -> AsyncIterator[str]:
    async def handle(connection: ServerConnection) -> None:
        await connection.wait_closed()

    async with serve(handle, "127.0.0.1", 0, process_request=http_router(routes, token, token_in_query)) as server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def page() -> tuple[str, bytes]:
    return "text/plain", b"page\n"


ROUTES: dict[str, Route] = {"/": page, "/metrics": lambda: ("text/plain", b"metrics\n")}


def test_without_a_token_every_page_is_open() -> None:
    async def scenario() -> list[tuple[int, str]]:
        async with serving(ROUTES, None) as base:
            return [await get(base + "/"), await get(base + "/metrics"), await get(base + "/nowhere")]

    assert asyncio.run(scenario()) == [(200, "page\n"), (200, "metrics\n"), (404, "not found\n")]


def test_in_a_private_swarm_every_page_needs_the_bearer_token() -> None:
    async def scenario() -> list[int]:
        async with serving(ROUTES, TOKEN) as base:
            return [
                (await get(base + "/metrics"))[0],
                (await get(base + "/metrics", {"Authorization": "Bearer wrong"}))[0],
                (await get(base + "/metrics", {"Authorization": f"Basic {TOKEN}"}))[0],
                (await get(base + "/metrics", {"Authorization": f"Bearer {TOKEN}"}))[0],
                (await get(base + "/", {"Authorization": f"bearer {TOKEN}"}))[0],
            ]

    assert asyncio.run(scenario()) == [401, 401, 401, 200, 200]


def test_the_token_is_taken_from_the_query_only_on_pages_a_browser_opens() -> None:
    async def scenario() -> list[int]:
        async with serving(ROUTES, TOKEN, token_in_query=("/",)) as base:
            return [
                (await get(base + f"/?token={TOKEN}"))[0],
                (await get(base + "/?token=wrong"))[0],
                (await get(base + f"/metrics?token={TOKEN}"))[0],
            ]

    assert asyncio.run(scenario()) == [200, 401, 401]


def test_a_cached_page_is_built_once_in_a_thread_for_a_burst_of_requests() -> None:
    builds: list[int] = []
    loop_thread = threading.get_ident()

    def build(generation: object) -> tuple[str, bytes]:
        assert threading.get_ident() != loop_thread, "built on the event loop"
        builds.append(1)
        return "text/plain", f"build {len(builds)}\n".encode()

    async def scenario() -> list[str]:
        cached = CachedBody(lambda: None, build, max_age=0.5)
        async with serving({"/state": cached}, None) as base:
            burst = await asyncio.gather(*(get(base + "/state") for _ in range(20)))
            await asyncio.sleep(0.6)
            later = await get(base + "/state")
        return [*sorted({body for _, body in burst}), later[1]]

    assert asyncio.run(scenario()) == ["build 1\n", "build 2\n"]
