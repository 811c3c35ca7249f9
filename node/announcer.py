"""Keeps every registry told about this node: announce on connect, then as a heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from swarm.errors import SwarmError
from swarm.protocol import Ack, Announce, Leave, PeerInfo
from swarm.transport import Credentials, open_connection, request

log = logging.getLogger("swarm.node")

TTL_HEARTBEATS = 3
"""A registry forgets a node after this many missed heartbeats."""


class Announcer:
    """One task per registry; reconnects with backoff, so a restarted registry relearns the node."""

    def __init__(
        self, registries: list[str], peer_info: Callable[[], PeerInfo], interval: float, credentials: Credentials
    ) -> None:
        self.registries = registries
        self.peer_info = peer_info
        self.interval = interval
        self.credentials = credentials
        self._wakes = {url: asyncio.Event() for url in registries}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_announcing(url)) for url in self.registries]

    def announce_now(self) -> None:
        """Send the current state at once (state changes should not wait for the next heartbeat)."""
        for wake in self._wakes.values():
            wake.set()

    async def stop(self, leave: bool = True) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if leave:
            peer_id = self.peer_info().peer_id
            await asyncio.gather(*(self._leave(url, peer_id) for url in self.registries), return_exceptions=True)

    async def _keep_announcing(self, url: str) -> None:
        backoff = 0.5
        while True:
            try:
                connection, _ = await open_connection(url, self.credentials, agent="swarm-node")
                backoff = 0.5
                async with connection:
                    while True:
                        self._wakes[url].clear()
                        message = Announce(peer=self.peer_info(), ttl=self.interval * TTL_HEARTBEATS)
                        await request(connection, message, Ack, timeout=self.interval * 2, peer=url)
                        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                        # races with the event being set (announce_now during shutdown), hanging stop()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.interval):
                                await self._wakes[url].wait()
            except (SwarmError, OSError) as exc:
                log.info("registry %s unreachable (%s); retrying in %.1f s", url, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.interval)

    async def _leave(self, url: str, peer_id: str) -> None:
        connection, _ = await open_connection(url, self.credentials, agent="swarm-node", timeout=2.0)
        async with connection:
            await request(connection, Leave(peer_id=peer_id), Ack, timeout=2.0, peer=url)
