"""The node's websocket endpoint: sessions, steps and stateless forwards over its span.

Each frame is answered in a task of its own, so a client may have several steps in flight on one connection
(replies carry their `step_id`); the steps themselves go through `swarm.node.steps`, which runs them in rounds on the
event loop, and so do stateless forwards (`swarm.node.forwards`). A session belongs to the connection that opened it
and ends with it.

Nothing but a small hello is read from a connection before its hello is accepted (`receive_hello`), and each client
holds at most its share of the node (`swarm.node.admission`, `swarm.node.sessions`). Peer-provided strings (session
ids, refusals that quote them) are logged with %r, so they cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
import websockets
from websockets.asyncio.server import ServerConnection

import swarm
from swarm.errors import ErrorCode, ProtocolError
from swarm.http import PROMETHEUS_CONTENT_TYPE, Route
from swarm.identity import span_digest
from swarm.node.admission import StepRate, client_address, client_keys
from swarm.node.forwards import ForwardService
from swarm.node.kv_cache import capacity_for
from swarm.node.latency import NeighbourLatencies
from swarm.node.metrics import NodeMetrics
from swarm.node.relay import RelayLinks
from swarm.node.sessions import ClientShare, SessionTable
from swarm.node.settings import NodeSettings
from swarm.node.span import LoadedSpan
from swarm.node.steps import StepScheduler, StepService
from swarm.node.training import BackwardService
from swarm.node.validation import PassLimits, check_layer_range, decode_adapter
from swarm.protocol import (
    CODECS,
    Backward,
    CloseSession,
    Error,
    Forward,
    Message,
    NodeLimits,
    OpenSession,
    PeerInfo,
    PeerState,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
    Welcome,
    decode_message,
)
from swarm.tensors import DTYPE_NAMES
from swarm.transport import Credentials, error_frame, limit_frames, receive_hello, send

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
    model_id: str | None = None
    """The checkpoint's architecture digest (`swarm.identity.model_id`)."""
    weights: str | None = None
    """The span's weights digest, once its layers are loaded (`swarm.identity.span_digest`)."""


class NodeServer:
    """Serves one span; `span` is None while the node is still loading (state `joining`)."""

    def __init__(self, settings: NodeSettings, identity: NodeIdentity) -> None:
        self.settings = settings
        self.identity = identity
        self.span: LoadedSpan | None = None
        self.state: PeerState = "joining"
        self.throughput = 0.0
        self.sessions = SessionTable(settings.cache_tokens, settings.max_sessions, client_share(settings))
        self.step_rate = StepRate(settings.max_steps_per_second_per_client)
        self.metrics = NodeMetrics(self.sessions, lambda: self.state)
        self.scheduler = StepScheduler(self._ready_span, self.metrics, settings.batch_steps, settings.prefill_chunk)
        self.relays = RelayLinks(
            settings.registry,
            Credentials(settings.token, settings.tls_ca),
            lambda: (identity.model_name, identity.model_id),
        )
        self.latencies = NeighbourLatencies(self.relays, self.peer_info, settings.probe_interval)
        self._connections: dict[int, ServerConnection] = {}
        """Open client connections by owner id: where a relayed step's answer goes."""
        self.steps = StepService(
            self.sessions,
            self._ready_span,
            self.scheduler,
            self._failed,
            identity.hidden_size,
            identity.dtype,
            settings.max_length,
            self.metrics,
            self.relays,
            self._deliver,
        )
        limits = PassLimits(
            identity.hidden_size,
            settings.max_batch_size,
            settings.max_length,
            settings.max_forward_tokens,
            settings.max_adapter_bytes,
        )
        self.forwards = ForwardService(self._ready_span, self.scheduler, limits, self.metrics)
        self.backwards = BackwardService(
            self._ready_span,
            settings.training,
            dataclasses.replace(limits, max_tokens=settings.max_training_tokens),
            self.metrics,
        )

    def take_span(self, span: LoadedSpan) -> None:
        """The span, once loaded: what the node serves, and the digest of its weights it announces."""
        self.span = span
        self.identity.weights = span_digest(span.stack.layer_digests)

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
            model_id=ident.model_id,
            weights=ident.weights,
            quantization=self.settings.quantize,
            training=self.settings.training,
            latencies_ms=self.latencies.announced(),
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
        owner, address = id(connection), client_address(connection.remote_address)
        answering: set[asyncio.Task[None]] = set()
        try:
            try:
                version = await receive_hello(connection, self.settings.token, self.settings.hello_timeout)
            except ProtocolError as exc:
                await send(connection, error_frame(exc))
                return
            limit_frames(connection, 2 * self.settings.max_message_bytes)  # beyond twice the limit: closed
            await send(connection, Welcome(version=version, node=self.peer_info(), limits=self.limits()))
            self._connections[owner] = connection
            async for frame in connection:
                task = asyncio.create_task(self._answer_frame(connection, frame, owner, address))
                answering.add(task)
                task.add_done_callback(answering.discard)
                if len(answering) >= FRAMES_IN_FLIGHT:
                    await asyncio.wait(answering, return_when=asyncio.FIRST_COMPLETED)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._connections.pop(owner, None)
            for task in answering:
                task.cancel()
            for session_id in self.sessions.close_owned_by(owner):
                log.info("session %r freed: its connection closed", session_id)
            self.step_rate.forget(("connection", owner))
            self.forwards.forget(owner)

    async def _answer_frame(
        self, connection: ServerConnection, frame: bytes | str, owner: int, address: str | None
    ) -> None:
        try:
            answer = await self._answer(frame, owner, address)
            if answer is not None:
                await send(connection, answer)
        except websockets.ConnectionClosed:
            pass

    async def _deliver(self, owner: int, result: StepResult) -> None:
        """A relayed step's answer, to the connection that owns its session (gone: the session went with it)."""
        connection = self._connections.get(owner)
        if connection is None:
            return
        try:
            await send(connection, result)
        except websockets.ConnectionClosed:
            pass

    async def _answer(self, frame: bytes | str, owner: int, address: str | None) -> Message | None:
        try:
            message = decode_message(frame, self.settings.max_message_bytes)
            if isinstance(message, (Step, Forward, Backward)):
                self._check_step_rate(message, owner, address)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.code).inc()
            return error_frame(exc)
        if isinstance(message, Step):
            return await self.steps.answer(message, owner)
        session_id = getattr(message, "session_id", None)
        try:
            return await self._dispatch(message, owner, address)
        except Exception as exc:
            return self._failed(exc, session_id, owner)

    def _check_step_rate(self, message: Step | Forward | Backward, owner: int, address: str | None) -> None:
        if not self.step_rate.allow(client_keys(owner, address), time.monotonic()):
            raise ProtocolError(
                ErrorCode.BUSY,
                f"this client sends more than its {self.step_rate.per_second:g} steps per second on this node; "
                "slow down or try another peer",
                getattr(message, "step_id", None),
            )

    def _failed(self, exc: Exception, session_id: str | None, owner: int) -> Error:
        """The error frame for a failed request, after ending the session it happened in (if it was this
        connection's): a malformed step may have been meant for another state of the session."""
        if isinstance(exc, ProtocolError):
            if session_id is not None and exc.code not in _SESSION_STAYS and self._owns(session_id, owner):
                self.sessions.close(session_id)
                log.info("session %r ended after a bad frame: %r", session_id, exc.message)
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

    async def _dispatch(self, message: Message, owner: int, address: str | None) -> Message:
        if isinstance(message, OpenSession):
            span = self._ready_span()
            check_layer_range(message.start, message.end, (span.start, span.end))
            check_session_size(message.max_length, message.batch_size, self.settings)
            adapter = decode_adapter(
                message.adapter, span.architecture.spec, message.start, message.end, self.settings.max_adapter_bytes
            )
            now = time.monotonic()
            needed = message.batch_size * capacity_for(message.max_length)
            for session_id in self.sessions.reclaim(needed, owner, address, now):
                log.info("session %r freed for a new client: it never stepped", session_id)
            self.sessions.open(
                message.session_id,
                owner,
                (message.start, message.end),
                message.max_length,
                message.batch_size,
                now,
                capacity_for,
                span.cache.allocate,
                address,
                adapter,
                message.relay_key,
            )
            return SessionOpened(session_id=message.session_id)
        if isinstance(message, CloseSession):
            self.sessions.get(message.session_id, owner)
            self.sessions.close(message.session_id)
            return SessionClosed(session_id=message.session_id)
        if isinstance(message, Forward):
            return await self.forwards.answer(message, owner)
        if isinstance(message, Backward):
            return await self.backwards.answer(message)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"a node does not accept {message.type!r} messages")

    def _ready_span(self) -> LoadedSpan:
        if self.span is None or self.state != "online":
            raise ProtocolError(ErrorCode.BUSY, f"node is {self.state}, not taking work; try another peer")
        return self.span

    def expire_sessions(self) -> None:
        settings = self.settings
        for session_id in self.sessions.expire(
            time.monotonic(), settings.session_idle_timeout, settings.max_session_seconds, settings.first_step_timeout
        ):
            log.info("session %r expired (idle, past its maximum age, or never stepped)", session_id)

    def http_routes(self) -> dict[str, Route]:
        return {
            "/metrics": lambda: (PROMETHEUS_CONTENT_TYPE, self.metrics.render()),
            "/healthz": lambda: ("text/plain; charset=utf-8", f"{self.state}\n".encode()),
        }


def client_share(settings: NodeSettings) -> ClientShare:
    """What one client may hold of this node (`--max-sessions-per-client`, `--max-cache-share-per-client`)."""
    sessions = settings.max_sessions_per_client or max(1, settings.max_sessions // 2)
    return ClientShare(sessions, int(settings.cache_tokens * settings.max_cache_share_per_client))


def check_session_size(max_length: int, batch_size: int, settings: NodeSettings) -> None:
    if max_length > settings.max_length:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"max_length {max_length} exceeds this node's limit of {settings.max_length}"
        )
    if batch_size > settings.max_batch_size:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"batch_size {batch_size} exceeds this node's limit of {settings.max_batch_size}"
        )
