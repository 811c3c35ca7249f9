"""The node's websocket endpoint: sessions, steps and stateless forwards over its span.

Each frame is answered in a task of its own, so a client may have several steps in flight on one connection
(replies carry their `step_id`); the steps themselves go through `swarm.node.steps`, which runs them in rounds on the
event loop. A session belongs to the connection that opened it and ends with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch
import websockets
from websockets.asyncio.server import ServerConnection

import swarm
from swarm.errors import ErrorCode, ProtocolError
from swarm.http import PROMETHEUS_CONTENT_TYPE, Route
from swarm.node.kv_cache import capacity_for
from swarm.node.metrics import NodeMetrics
from swarm.node.sessions import SessionTable
from swarm.node.settings import NodeSettings
from swarm.node.span import LoadedSpan
from swarm.node.steps import StepScheduler, StepService
from swarm.node.validation import check_layer_range, decode_hidden, decode_mask, decode_positions
from swarm.protocol import (
    CODECS,
    DTYPE_NAMES,
    CloseSession,
    Error,
    Forward,
    ForwardResult,
    Message,
    NodeLimits,
    OpenSession,
    PeerInfo,
    PeerState,
    SessionClosed,
    SessionOpened,
    Step,
    Welcome,
    WireTensor,
    decode_message,
)
from swarm.transport import check_hello, error_frame, send

log = logging.getLogger("swarm.node")

FRAMES_IN_FLIGHT = 64
"""Frames of one connection being answered at once; beyond that the node stops reading it until one is done."""

_SESSION_STAYS = frozenset({ErrorCode.UNKNOWN_SESSION, ErrorCode.BUSY})
"""Refusals that leave the session as it was (there is none, or the node is draining): every other error frame
about a session ends it, since a malformed step may have been meant for another state of the session."""


@dataclass
class NodeIdentity:
    peer_id: str
    model_name: str
    num_layers: int
    start: int
    end: int
    dtype: torch.dtype
    hidden_size: int
    address: str = ""


class NodeServer:
    """Serves one span; `span` is None while the node is still loading (state `joining`)."""

    def __init__(self, settings: NodeSettings, identity: NodeIdentity) -> None:
        self.settings = settings
        self.identity = identity
        self.span: LoadedSpan | None = None
        self.state: PeerState = "joining"
        self.throughput = 0.0
        self.sessions = SessionTable(settings.cache_tokens, settings.max_sessions)
        self.metrics = NodeMetrics(self.sessions, lambda: self.state)
        self.scheduler = StepScheduler(self._ready_span, self.metrics, settings.batch_steps, settings.prefill_chunk)
        self.steps = StepService(
            self.sessions,
            self._ready_span,
            self.scheduler,
            self._failed,
            identity.hidden_size,
            identity.dtype,
            settings.max_length,
            self.metrics,
        )

    def peer_info(self) -> PeerInfo:
        ident = self.identity
        return PeerInfo(
            peer_id=ident.peer_id,
            address=ident.address,
            model=ident.model_name,
            num_layers=ident.num_layers,
            start=ident.start,
            end=ident.end,
            state=self.state,
            dtype=DTYPE_NAMES[ident.dtype],
            throughput=self.throughput,
            cache_tokens_free=self.sessions.tokens_free,
            cache_tokens_total=self.sessions.cache_tokens,
            sessions=len(self.sessions),
            version=swarm.__version__,
            codecs=list(CODECS),
        )

    def limits(self) -> NodeLimits:
        return NodeLimits(
            max_message_bytes=self.settings.max_message_bytes,
            max_batch_size=self.settings.max_batch_size,
            max_length=self.settings.max_length,
            hidden_size=self.identity.hidden_size,
        )

    async def handle(self, connection: ServerConnection) -> None:
        """One client or peer connection: handshake, then every frame answered in a task of its own."""
        owner = id(connection)
        answering: set[asyncio.Task[None]] = set()
        try:
            try:
                version = check_hello(
                    decode_message(await connection.recv(), self.settings.max_message_bytes), self.settings.token
                )
            except ProtocolError as exc:
                await send(connection, error_frame(exc))
                return
            await send(connection, Welcome(version=version, node=self.peer_info(), limits=self.limits()))
            async for frame in connection:
                task = asyncio.create_task(self._answer_frame(connection, frame, owner))
                answering.add(task)
                task.add_done_callback(answering.discard)
                if len(answering) >= FRAMES_IN_FLIGHT:
                    await asyncio.wait(answering, return_when=asyncio.FIRST_COMPLETED)
        except websockets.ConnectionClosed:
            pass
        finally:
            for task in answering:
                task.cancel()
            for session_id in self.sessions.close_owned_by(owner):
                log.info("session %s freed: its connection closed", session_id)

    async def _answer_frame(self, connection: ServerConnection, frame: bytes | str, owner: int) -> None:
        try:
            await send(connection, await self._answer(frame, owner))
        except websockets.ConnectionClosed:
            pass

    async def _answer(self, frame: bytes | str, owner: int) -> Message:
        try:
            message = decode_message(frame, self.settings.max_message_bytes)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.code).inc()
            return error_frame(exc)
        if isinstance(message, Step):
            return await self.steps.answer(message, owner)
        session_id = getattr(message, "session_id", None)
        try:
            return await self._dispatch(message, owner)
        except Exception as exc:
            return self._failed(exc, session_id, owner)

    def _failed(self, exc: Exception, session_id: str | None, owner: int) -> Error:
        """The error frame for a failed request, after ending the session it happened in (if it was this
        connection's): a malformed step may have been meant for another state of the session."""
        if isinstance(exc, ProtocolError):
            if session_id is not None and exc.code not in _SESSION_STAYS and self._owns(session_id, owner):
                self.sessions.close(session_id)
                log.info("session %s ended after a bad frame: %s", session_id, exc.message)
            self.metrics.errors.labels(exc.code).inc()
            return error_frame(exc, session_id)
        # a bug or a device error: end the session, keep the node
        log.error("internal error while serving a frame", exc_info=exc)
        if session_id is not None and self._owns(session_id, owner):
            self.sessions.close(session_id)
        self.metrics.errors.labels(ErrorCode.INTERNAL).inc()
        return error_frame(ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"), session_id)

    def _owns(self, session_id: str, owner: int) -> bool:
        try:
            self.sessions.get(session_id, owner)
        except ProtocolError:
            return False
        return True

    async def _dispatch(self, message: Message, owner: int) -> Message:
        if isinstance(message, OpenSession):
            span = self._ready_span()
            check_layer_range(message.start, message.end, (span.start, span.end))
            check_session_size(message.max_length, message.batch_size, self.settings)
            self.sessions.open(
                message.session_id,
                owner,
                (message.start, message.end),
                message.max_length,
                message.batch_size,
                time.monotonic(),
                capacity_for,
                span.cache.allocate,
            )
            return SessionOpened(session_id=message.session_id)
        if isinstance(message, CloseSession):
            self.sessions.get(message.session_id, owner)
            self.sessions.close(message.session_id)
            return SessionClosed(session_id=message.session_id)
        if isinstance(message, Forward):
            return self._forward(message)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"a node does not accept {message.type!r} messages")

    def _ready_span(self) -> LoadedSpan:
        if self.span is None or self.state != "online":
            raise ProtocolError(ErrorCode.BUSY, f"node is {self.state}, not taking work; try another peer")
        return self.span

    def _forward(self, message: Forward) -> ForwardResult:
        """A stateless pass over a whole sequence, computed at once (it keeps the loop for its duration)."""
        span = self._ready_span()
        check_layer_range(message.start, message.end, (span.start, span.end))
        hidden = decode_hidden(message.hidden, self.identity.hidden_size, self.settings.max_batch_size)
        shape = (hidden.shape[0], hidden.shape[1])
        positions = decode_positions(message.position_ids, shape, self.settings.max_length)
        mask = decode_mask(message.attention_mask, shape)
        real = mask if mask is not None else torch.ones(shape, dtype=torch.bool)
        began = time.perf_counter()
        out = span.forward_stateless(hidden, positions, real, message.start, message.end)
        self.metrics.step_seconds.observe(time.perf_counter() - began)
        self.metrics.steps.labels("forward").inc()
        return ForwardResult(hidden=WireTensor.from_torch(out, message.hidden.codec))

    def expire_sessions(self) -> None:
        settings = self.settings
        for session_id in self.sessions.expire(
            time.monotonic(), settings.session_idle_timeout, settings.max_session_seconds
        ):
            log.info("session %s expired (idle or past its maximum age)", session_id)

    def http_routes(self) -> dict[str, Route]:
        return {
            "/metrics": lambda: (PROMETHEUS_CONTENT_TYPE, self.metrics.render()),
            "/healthz": lambda: ("text/plain; charset=utf-8", f"{self.state}\n".encode()),
        }


def check_session_size(max_length: int, batch_size: int, settings: NodeSettings) -> None:
    if max_length > settings.max_length:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"max_length {max_length} exceeds this node's limit of {settings.max_length}"
        )
    if batch_size > settings.max_batch_size:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"batch_size {batch_size} exceeds this node's limit of {settings.max_batch_size}"
        )
