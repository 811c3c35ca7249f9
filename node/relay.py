"""Node-to-node forwarding: a node sends its output for a relayed step straight to the next node of the client's
chain, so a token waits about one one-way trip per hop instead of a round trip through the client per hop.

The next node is reached over a connection of this node's own (with the swarm's token and TLS trust, like any
client), kept open and shared by every relayed step. A node only forwards to an address the registries list for its
own model (a registry asked about that address, at most every `VIEW_SECONDS` once listed and once a second while
not): a client cannot make a node send traffic to arbitrary hosts. What the next node answers goes to the client
directly (to the connection that owns the session there), not back here; frames this node gets on its relay
connections are only refusals of frames that could not be read at all, and are logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import websockets
from websockets.asyncio.client import ClientConnection

from swarm.errors import ErrorCode, PeerUnreachableError, ProtocolError, RegistryUnavailableError, SwarmError
from swarm.protocol import Step, decode_message, encode_message
from swarm.registry.client import RegistryPool, fetch_peers
from swarm.transport import Credentials, open_connection

log = logging.getLogger("swarm.node")

VIEW_SECONDS = 5.0
MAX_REMEMBERED = 4096
"""Addresses a node remembers being refused (forgotten all at once beyond it: the check is only asked again)."""
CONNECT_TIMEOUT = 3.0


class RelayLinks:
    """This node's connections to the next nodes of clients' chains; `model()` names the model it serves (its
    name and `model_id`), whose peers it forwards to."""

    def __init__(
        self, registries: list[str], credentials: Credentials, model: Callable[[], tuple[str, str | None]]
    ) -> None:
        self.registries = registries
        self.credentials = credentials
        self.model = model
        self.registry_pool = RegistryPool(credentials, agent="swarm-node")
        """Connections to the registries, kept for this node's checks and its neighbours' listings."""
        self._listed: dict[str, float] = {}  # address -> when a registry last listed it
        self._refused: dict[str, float] = {}  # address -> when a registry last did not
        self._connections: dict[str, ClientConnection] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._readers: set[asyncio.Task[None]] = set()

    async def forward(self, address: str, step: Step) -> None:
        """Send `step` to the node at `address`; `ProtocolError` (the address is not a listed peer) or
        `PeerUnreachableError` (it cannot be reached) when it cannot be sent."""
        await self._check_listed(address)
        connection = await self._connection(address)
        try:
            await connection.send(encode_message(step))
        except (websockets.ConnectionClosed, OSError) as exc:
            self._connections.pop(address, None)
            raise PeerUnreachableError(f"forwarding to {address}: {exc}") from exc

    async def round_trip(self, address: str, timeout: float = CONNECT_TIMEOUT) -> float:
        """Seconds a websocket ping to the node at `address` takes to come back, over the connection relayed
        steps use (opened if need be; the caller names a peer it just found listed); `PeerUnreachableError` when
        there is no answer within `timeout`."""
        try:
            connection = await self._connection(address)
            began = time.monotonic()
            async with asyncio.timeout(timeout):
                await (await connection.ping())
        except (websockets.ConnectionClosed, OSError, TimeoutError, SwarmError) as exc:
            self._connections.pop(address, None)
            raise PeerUnreachableError(f"no ping answer from {address}: {exc!r}") from exc
        return time.monotonic() - began

    async def _check_listed(self, address: str) -> None:
        listed_at = self._listed.get(address)
        if listed_at is not None and time.monotonic() - listed_at < VIEW_SECONDS:
            return
        checked_at = self._refused.get(address)
        if checked_at is None or time.monotonic() - checked_at >= 1.0:  # a refused address is asked again at most
            name, model_id = self.model()  # once a second
            try:
                peers = await fetch_peers(
                    self.registries, name, self.credentials, model_id, pool=self.registry_pool, address=address
                )
            except RegistryUnavailableError as exc:
                raise PeerUnreachableError(f"cannot check {address} with a registry: {exc}") from exc
            if peers:
                self._listed[address] = time.monotonic()
                self._refused.pop(address, None)
                return
            self._listed.pop(address, None)
            if len(self._refused) >= MAX_REMEMBERED:
                self._refused.clear()
            self._refused[address] = time.monotonic()
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{address} is not a peer the registries list for {self.model()[0]}")

    async def _connection(self, address: str) -> ClientConnection:
        lock = self._opening.setdefault(address, asyncio.Lock())
        async with lock:
            connection = self._connections.get(address)
            if connection is not None and connection.state.name == "OPEN":
                return connection
            connection, _ = await open_connection(
                address, self.credentials, agent="swarm-node", timeout=CONNECT_TIMEOUT
            )
            self._connections[address] = connection
            reader = asyncio.create_task(self._drain(address, connection))
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
            return connection

    async def _drain(self, address: str, connection: ClientConnection) -> None:
        try:
            async for frame in connection:
                try:
                    message = decode_message(frame)
                except ProtocolError as exc:
                    log.info("relay link to %s sent an unreadable frame: %s", address, exc)
                    continue
                log.info("relay link to %s refused a forwarded frame: %r", address, getattr(message, "message", ""))
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._connections.get(address) is connection:
                del self._connections[address]

    async def close(self) -> None:
        for connection in list(self._connections.values()):
            await connection.close()
        for reader in list(self._readers):
            reader.cancel()
        await self.registry_pool.close()
