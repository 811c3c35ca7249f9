"""One connection per peer, shared by every session this client holds there.

Concurrent sessions (a gateway's requests, `DecodeScheduler`'s jobs) step at about the same moment. On a
shared channel, the steps queued while the previous frame was in flight leave together as one `StepMany`
frame, so the peer reads, validates and answers them in one go, and its batcher runs them as one round.
Other requests (open, close) take their turn between frames.

A peer sees one connection, so the sessions opened on it belong to it: when it drops, the peer frees them
all, and every session waiting on it gets `PeerUnreachableError` and fails over on its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection

from swarm.errors import PeerUnreachableError, RemoteError
from swarm.protocol import (
    MAX_STEPS_PER_FRAME,
    Error,
    Step,
    StepGroup,
    StepGroupResult,
    StepMany,
    StepManyResult,
    StepResult,
)
from swarm.transport import Credentials, open_connection, request

log = logging.getLogger("swarm.client")

ReplyT = TypeVar("ReplyT", bound=BaseModel)

COALESCE_BYTES = 8 * 2**20
"""Steps join a frame while their tensors fit in this many bytes (a lone step always goes): well under a
node's frame limit, so long prompts queued together still travel, just in separate frames."""


@dataclass
class _QueuedStep:
    step: Step
    reply: asyncio.Future[StepResult]


@dataclass
class PeerChannel:
    """A connection to one peer that carries frames one at a time and coalesces concurrent steps."""

    address: str
    connection: ClientConnection
    timeout: float
    version: int = 1
    """The protocol version the peer answered `hello` in: `step_group` frames need 2."""
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    _queued: list[_QueuedStep] = field(default_factory=list)
    _sender: asyncio.Task[None] | None = None
    steps_sent: int = 0
    frames_sent: int = 0
    broken: bool = False
    """Set when a frame went unanswered or the wrong answer came: replies could no longer be told apart."""

    @property
    def alive(self) -> bool:
        return not self.broken and self.connection.state.name == "OPEN"

    async def request(self, message: BaseModel, expect: type[ReplyT], timeout: float | None = None) -> ReplyT:
        async with self._turn:
            try:
                return await request(self.connection, message, expect, timeout or self.timeout, self.address)
            except RemoteError:
                raise
            except Exception:
                self._break()
                raise

    @property
    def takes_groups(self) -> bool:
        return self.version >= 2

    async def step_group(self, group: StepGroup) -> StepGroupResult:
        """Send a group of sessions' steps as one frame, between the other frames (see `client.group`)."""
        self.frames_sent += 1
        self.steps_sent += len(group.session_ids)
        reply = await self.request(group, StepGroupResult)
        if len(reply.errors) != len(group.session_ids) or reply.hidden.shape[:1] != [sum(group.rows)]:
            self._break()
            raise PeerUnreachableError(f"{self.address} answered a group of {len(group.session_ids)} steps wrongly")
        return reply

    async def step(self, step: Step) -> StepResult:
        """Send `step` in the next frame to this peer and wait for its own result.

        A step that finds the channel idle leaves at once from the caller's own task (a lone generation's
        every step): no sender task, no extra turns of the event loop. Steps that come while a frame is in
        flight queue up and leave together after it."""
        if not self._queued and not self._turn.locked():
            async with self._turn:  # free, so taken without yielding: nobody can slip in before this frame
                try:
                    (outcome,) = await self._exchange([step])
                except Exception:  # the connection is gone or the frame was refused
                    self._break()
                    raise
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        queued = _QueuedStep(step, asyncio.get_running_loop().create_future())
        self._queued.append(queued)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_queued())
        return await queued.reply

    async def _send_queued(self) -> None:
        while self._queued:
            async with self._turn:
                batch = _next_frame(self._queued)
                self._queued = self._queued[len(batch) :]
                try:
                    results = await self._exchange([queued.step for queued in batch])
                except Exception as exc:  # the connection is gone or the frame was refused: every step fails
                    self._break()
                    for queued in batch:
                        _settle(queued.reply, exc)
                    continue
            for queued, result in zip(batch, results, strict=True):
                _settle(queued.reply, result)

    async def _exchange(self, steps: list[Step]) -> list[StepResult | Exception]:
        self.frames_sent += 1
        self.steps_sent += len(steps)
        if len(steps) == 1:
            try:
                return [await request(self.connection, steps[0], StepResult, self.timeout, self.address)]
            except RemoteError as exc:
                return [exc]
        many = StepMany.trusted(type="step_many", steps=steps)
        reply = await request(self.connection, many, StepManyResult, self.timeout, self.address)
        if len(reply.results) != len(steps):
            raise PeerUnreachableError(f"{self.address} answered {len(reply.results)} of {len(steps)} steps")
        return [
            RemoteError(result.code, result.message, self.address) if isinstance(result, Error) else result
            for result in reply.results
        ]

    def _break(self) -> None:
        """Give up on the connection at once; the peer frees its sessions, which fail over elsewhere."""
        self.broken = True
        self.connection.transport.abort()

    async def close(self) -> None:
        await self.connection.close()


def _next_frame(queued: list[_QueuedStep]) -> list[_QueuedStep]:
    size, count = 0, 0
    for item in queued[:MAX_STEPS_PER_FRAME]:
        size += _step_bytes(item.step)
        if count and size > COALESCE_BYTES:
            break
        count += 1
    return queued[:count]


def _step_bytes(step: Step) -> int:
    tensors = (step.hidden, step.position_ids, step.attention_mask, step.hypo_ids)
    return sum(len(tensor.data) for tensor in tensors if tensor is not None)


def _settle(future: asyncio.Future[StepResult], outcome: StepResult | Exception) -> None:
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class ChannelPool:
    """This client's channels, one per peer address, opened on first use and replaced once they drop."""

    def __init__(self, credentials: Credentials, timeout: float) -> None:
        self.credentials = credentials
        self.timeout = timeout
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
        try:
            connection, welcome = await open_connection(address, self.credentials, agent="swarm-client")
        except BaseException as exc:
            opening.set_exception(exc)
            opening.exception()  # retrieved here, so nobody else waiting is required
            raise
        finally:
            del self._opening[address]
        channel = PeerChannel(address, connection, self.timeout, welcome.version)
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
