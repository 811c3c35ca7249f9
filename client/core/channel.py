"""One connection per peer, shared by every session this client holds there, with several steps in flight.

A step goes out as soon as it is ready; its reply is matched by `step_id`, whatever order replies come in, so
the sessions of a client (a gateway's requests, `DecodeScheduler`'s lanes) never wait for each other's frames.
`open_session` and `close_session` are answered by session id. A reader task receives every frame of the
connection and hands each reply to whoever waits for it.

A peer sees one connection, so the sessions opened on it belong to it: when it drops, the peer frees them
all, and every session waiting on it gets `PeerUnreachableError` and fails over on its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import websockets
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection

from swarm.errors import ErrorCode, PeerUnreachableError, ProtocolError, RemoteError
from swarm.protocol import (
    Error,
    PeerInfo,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
    decode_message,
    encode_message,
)
from swarm.transport import Credentials, open_connection

log = logging.getLogger("swarm.client")

ReplyT = TypeVar("ReplyT", bound=BaseModel)

HANDSHAKE_TIMEOUT = 3.0
"""Connecting and exchanging `hello`/`welcome` with a peer: a node answers at once from its event loop, so a
peer that takes longer is gone or silent on purpose, and every second spent on it is a second of someone's
first token."""


@dataclass
class PeerChannel:
    """A connection to one peer that carries any number of requests at once."""

    address: str
    connection: ClientConnection
    timeout: float
    version: int = 4
    node: PeerInfo | None = None
    """Who answered the handshake: the node's own `PeerInfo` from its `welcome`."""
    _steps: dict[int, asyncio.Future[StepResult]] = field(default_factory=dict)
    _requests: dict[str, asyncio.Future[BaseModel]] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None
    _step_ids: itertools.count[int] = field(default_factory=itertools.count)
    _abandoned: set[int] = field(default_factory=set)
    """Steps whose answers nobody waits for any more (a relayed step given up): dropped when they come."""
    steps_sent: int = 0
    frames_sent: int = 0
    broken: bool = False
    """Set when the connection failed, a request went unanswered or an answer matched nothing."""

    @property
    def alive(self) -> bool:
        return not self.broken and self.connection.state.name == "OPEN"

    def next_step_id(self) -> int:
        return next(self._step_ids)

    async def step(self, message: Step) -> StepResult:
        """Send `message` (its `step_id` from `next_step_id`) and wait for its reply, while other frames come and
        go. A step refused as a whole raises `RemoteError`; per-session errors are in the reply's `errors`."""
        reply = asyncio.get_running_loop().create_future()
        self._steps[message.step_id] = reply
        self.frames_sent += 1
        self.steps_sent += len(message.session_ids)
        result = await self._exchange(message, reply, lambda: self._steps.pop(message.step_id, None))
        if result.hidden.shape[:1] != [sum(message.rows)] or (
            result.errors is not None and len(result.errors) != len(message.session_ids)
        ):
            self._break(PeerUnreachableError(f"{self.address} answered a step of {sum(message.rows)} rows wrongly"))
            raise PeerUnreachableError(f"{self.address} answered a step wrongly")
        return result

    def expect(self, step_id: int) -> asyncio.Future[StepResult]:
        """Wait for the answer to a step another peer sends here on this client's behalf (node-to-node
        forwarding): registered before the step leaves the client, so the answer cannot come first."""
        reply: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._steps[step_id] = reply
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        return reply

    async def wait(self, step_id: int, reply: asyncio.Future[StepResult]) -> StepResult:
        """The answer `expect` registered, within the channel's timeout; a refusal raises `RemoteError`."""
        if self.broken:
            self._steps.pop(step_id, None)
            raise PeerUnreachableError(f"the connection to {self.address} is gone")
        try:
            async with asyncio.timeout(self.timeout):
                return await reply
        except TimeoutError:
            self._break(PeerUnreachableError(f"{self.address} did not answer within {self.timeout} s"))
            raise PeerUnreachableError(f"{self.address} did not answer within {self.timeout} s") from None
        finally:
            self._steps.pop(step_id, None)

    def abandon(self, step_id: int) -> None:
        """Stop waiting for a step's answer; if it still comes, it is dropped."""
        reply = self._steps.pop(step_id, None)
        if reply is not None and not reply.done():
            reply.cancel()
        self._abandoned.add(step_id)

    async def send(self, message: Step) -> None:
        """Send a step whose answers were registered with `expect` (they may come on other channels)."""
        if self.broken:
            raise PeerUnreachableError(f"the connection to {self.address} is gone")
        self.frames_sent += 1
        self.steps_sent += len(message.session_ids)
        try:
            await self.connection.send(encode_message(message))
        except (websockets.ConnectionClosed, OSError) as exc:
            self._break(PeerUnreachableError(f"connection to {self.address} lost: {exc}"))
            raise PeerUnreachableError(f"connection to {self.address} lost: {exc}") from exc

    async def request(self, message: BaseModel, expect: type[ReplyT], timeout: float | None = None) -> ReplyT:
        """`open_session` or `close_session`, answered by the session's id."""
        session_id: str = message.session_id  # type: ignore[attr-defined]
        reply = asyncio.get_running_loop().create_future()
        self._requests[session_id] = reply
        answer = await self._exchange(message, reply, lambda: self._requests.pop(session_id, None), timeout)
        if not isinstance(answer, expect):
            self._break(ProtocolError(ErrorCode.BAD_REQUEST, f"{self.address} answered {answer.type!r}"))  # type: ignore[attr-defined]
            raise PeerUnreachableError(f"expected {expect.__name__} from {self.address}, got {answer.type!r}")  # type: ignore[attr-defined]
        return answer

    async def _exchange(self, message, reply, forget, timeout: float | None = None):  # type: ignore[no-untyped-def]
        if self.broken:
            forget()
            raise PeerUnreachableError(f"the connection to {self.address} is gone")
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        try:
            await self.connection.send(encode_message(message))
            async with asyncio.timeout(timeout or self.timeout):
                return await reply
        except (websockets.ConnectionClosed, OSError) as exc:
            self._break(PeerUnreachableError(f"connection to {self.address} lost: {exc}"))
            raise PeerUnreachableError(f"connection to {self.address} lost: {exc}") from exc
        except TimeoutError:  # the peer's state for this request is unknown: give the connection up
            self._break(PeerUnreachableError(f"{self.address} did not answer within {timeout or self.timeout} s"))
            raise PeerUnreachableError(f"{self.address} did not answer within {timeout or self.timeout} s") from None
        finally:
            forget()

    async def _read(self) -> None:
        """Hand every frame to the request it answers; anything unmatched breaks the connection."""
        try:
            async for frame in self.connection:
                self._deliver(decode_message(frame))
        except Exception as exc:  # the connection dropped, or a frame made no sense
            self._break(PeerUnreachableError(f"connection to {self.address} lost: {exc}"))
        else:
            self._break(PeerUnreachableError(f"{self.address} closed the connection"))

    def _deliver(self, message: BaseModel) -> None:
        if isinstance(message, StepResult):
            waiting = self._steps.get(message.step_id)
        elif isinstance(message, (SessionOpened, SessionClosed)):
            waiting = self._requests.get(message.session_id)
        elif isinstance(message, Error) and message.step_id is not None:
            waiting = self._steps.get(message.step_id)
        elif isinstance(message, Error) and message.session_id is not None:
            waiting = self._requests.get(message.session_id)
        else:
            waiting = None
        if waiting is None:
            step_id = getattr(message, "step_id", None)
            if step_id in self._abandoned:
                self._abandoned.discard(step_id)
                return
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{self.address} sent {message.type!r} that answers nothing")  # type: ignore[attr-defined]
        if waiting.done():
            return
        if isinstance(message, Error):
            waiting.set_exception(RemoteError(message.code, message.message, self.address))
        else:
            waiting.set_result(message)

    def _break(self, error: Exception) -> None:
        """Give up on the connection at once; every request waiting on it fails, the peer frees its sessions."""
        if not self.broken:
            self.broken = True
            self.connection.transport.abort()
        for waiting in [*self._steps.values(), *self._requests.values()]:
            if not waiting.done():
                waiting.set_exception(error)

    async def close(self) -> None:
        await self.connection.close()
        if self._reader is not None:
            self._reader.cancel()


class ChannelPool:
    """This client's channels, one per peer address, opened on first use and replaced once they drop.
    `on_round_trip(peer_id, seconds)` hears each new channel's measured round trip: connecting and the hello
    exchange take two (the TCP handshake, then `hello` and `welcome`)."""

    def __init__(
        self,
        credentials: Credentials,
        timeout: float,
        on_round_trip: Callable[[str, float], None] | None = None,
    ) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.on_round_trip = on_round_trip
        self._channels: dict[str, PeerChannel] = {}
        self._opening: dict[str, asyncio.Future[PeerChannel]] = {}

    @property
    def channels(self) -> list[PeerChannel]:
        """Channels opened so far, the dropped ones included until they are replaced."""
        return list(self._channels.values())

    async def get(self, address: str) -> PeerChannel:
        channel = self._channels.get(address)
        if channel is not None and channel.alive:
            return channel
        if address in self._opening:  # another session is connecting there right now: share its connection
            return await asyncio.shield(self._opening[address])
        opening = asyncio.get_running_loop().create_future()
        self._opening[address] = opening
        began = time.monotonic()
        try:
            connection, welcome = await open_connection(
                address, self.credentials, agent="swarm-client", timeout=HANDSHAKE_TIMEOUT
            )
            if self.on_round_trip is not None and welcome.node is not None:
                self.on_round_trip(welcome.node.peer_id, (time.monotonic() - began) / 2)
        except BaseException as exc:
            opening.set_exception(exc)
            opening.exception()  # retrieved here, so nobody else waiting is required
            raise
        finally:
            del self._opening[address]
        channel = PeerChannel(address, connection, self.timeout, welcome.version, welcome.node)
        self._channels[address] = channel
        opening.set_result(channel)
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            try:
                await channel.close()
            except Exception as exc:  # closing is best effort: the peer frees our sessions either way
                log.debug("closing the channel to %s: %s", channel.address, exc)
