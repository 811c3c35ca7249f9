"""The node's websocket endpoint: sessions, steps and stateless forwards over its span.

All compute runs on one worker thread, so the event loop stays free for heartbeats and other
clients' frames, and two sessions never touch the layers at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
import websockets
from websockets.asyncio.server import ServerConnection

import swarm
from node.batching import StepBatcher
from node.kv_cache import capacity_for
from node.metrics import NodeMetrics
from node.sessions import SessionTable
from node.settings import NodeSettings
from node.span import LoadedSpan
from node.validation import (
    StepInputs,
    check_layer_range,
    decode_group,
    decode_hidden,
    decode_mask,
    decode_positions,
    validate_group_member,
    validate_step,
)
from swarm.errors import ProtocolError
from swarm.http import PROMETHEUS_CONTENT_TYPE, Route
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
    StepGroup,
    StepGroupResult,
    StepMany,
    StepManyResult,
    StepResult,
    Welcome,
    WireTensor,
    decode_message,
)
from swarm.transport import check_hello, error_frame, send

log = logging.getLogger("swarm.node")

INLINE_SECONDS = 0.005
"""Lone decode steps faster than this on average skip the hop to the compute thread (see `_compute`)."""

T = TypeVar("T")


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
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-compute")
        self._computing = 0  # calls on the compute thread now (or waiting for it)
        self._quick_seconds = 0.0  # moving average of how long quick calls take
        self.metrics = NodeMetrics(self.sessions, lambda: self.state)
        self.batcher = StepBatcher(
            self._compute,
            self._ready_span,
            self.metrics.batched_steps.inc,
            enabled=settings.batch_steps,
            chunk_tokens=settings.prefill_chunk,
            runs_inline=self._runs_inline,
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
        """One client or peer connection: handshake, then request/reply until it closes."""
        owner = id(connection)
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
                await send(connection, await self._answer(frame, owner))
        except websockets.ConnectionClosed:
            pass
        finally:
            for session_id in self.sessions.close_owned_by(owner):
                log.info("session %s freed: its connection closed", session_id)

    async def _answer(self, frame: bytes | str, owner: int) -> Message:
        try:
            message = decode_message(frame, self.settings.max_message_bytes)
        except ProtocolError as exc:
            self.metrics.errors.labels(exc.code).inc()
            return error_frame(exc)
        if isinstance(message, StepMany):  # each step succeeds or fails on its own; they share one round
            answers = [self._guarded(self._step(step, owner), step.session_id, owner) for step in message.steps]
            return StepManyResult.trusted(type="step_many_result", results=await asyncio.gather(*answers))
        if isinstance(message, StepGroup):
            return await self._step_group(message, owner)
        return await self._guarded(self._dispatch(message, owner), getattr(message, "session_id", None), owner)

    async def _guarded(self, answer: Awaitable[Message], session_id: str | None, owner: int) -> Message:
        """The answer, or the error frame it ended in; an error ends the session it happened in."""
        try:
            return await answer
        except Exception as exc:
            return self._failed(exc, session_id, owner)

    def _failed(self, exc: Exception, session_id: str | None, owner: int) -> Error:
        """The error frame for a failed request, after ending the session it happened in (if it was this
        connection's): a malformed step may have been meant for another state of the session."""
        if isinstance(exc, ProtocolError):
            if session_id is not None and exc.code not in ("unknown_session", "busy") and self._owns(session_id, owner):
                self.sessions.close(session_id)
                log.info("session %s ended after a bad frame: %s", session_id, exc.message)
            self.metrics.errors.labels(exc.code).inc()
            return error_frame(exc, session_id)
        # a bug or a device error: end the session, keep the node
        log.error("internal error while serving a frame", exc_info=exc)
        if session_id is not None and self._owns(session_id, owner):
            self.sessions.close(session_id)
        self.metrics.errors.labels("internal").inc()
        return error_frame(ProtocolError("internal", f"{type(exc).__name__}: {exc}"), session_id)

    def _owns(self, session_id: str, owner: int) -> bool:
        try:
            self.sessions.get(session_id, owner)
        except ProtocolError:
            return False
        return True

    async def _dispatch(self, message: Message, owner: int) -> Message:
        if isinstance(message, Step):
            return await self._step(message, owner, alone=True)
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
            return await self._forward(message)
        raise ProtocolError("bad_request", f"a node does not accept {message.type!r} messages")

    def _ready_span(self) -> LoadedSpan:
        if self.span is None or self.state != "online":
            raise ProtocolError("busy", f"node is {self.state}, not taking work; try another peer")
        return self.span

    async def _step(self, message: Step, owner: int, alone: bool = False) -> StepResult:
        """`alone`: the step came in a frame of its own (a `step_many` frame's steps are meant to batch)."""
        self._ready_span()  # refuses work unless online
        session = self.sessions.get(message.session_id, owner)
        inputs = validate_step(
            session,
            message.hidden,
            message.position_ids,
            message.attention_mask,
            message.hypo_ids,
            self.identity.hidden_size,
        )
        session.last_used = time.monotonic()
        hidden = await self.batcher.submit(session, inputs, alone=alone)
        self.metrics.steps.labels("step").inc()
        reply = WireTensor.from_torch(hidden, message.hidden.codec)  # replies mirror the request's codec
        return StepResult.trusted(
            type="step_result", session_id=session.session_id, step_id=message.step_id, hidden=reply
        )

    async def _step_group(self, message: StepGroup, owner: int) -> StepGroupResult:
        """Each session's rows of the group are a step of its own, checked, run and answered on its own (a bad
        one ends only its session), but the group's tensors are decoded and checked once for all of them."""
        rows = message.rows
        outcomes: list[torch.Tensor | BaseException]
        try:
            self._ready_span()
            group = decode_group(message, self.identity.hidden_size, self.settings.max_length)
        except ProtocolError as exc:  # nothing in the group can run: every session's step failed
            outcomes = [exc] * len(rows)
        else:
            steps, first = [], 0
            for session_id, count in zip(message.session_ids, rows, strict=True):
                steps.append(self._group_member(session_id, owner, group, slice(first, first + count)))
                first += count
            outcomes = await asyncio.gather(*steps, return_exceptions=True)
        outputs, errors = [], []
        for session_id, count, outcome in zip(message.session_ids, rows, outcomes, strict=True):
            if isinstance(outcome, torch.Tensor):
                outputs.append(outcome)
                errors.append(None)
                continue
            if not isinstance(outcome, Exception):  # cancelled: the connection is going away
                raise outcome
            outputs.append(torch.zeros(count, 1, self.identity.hidden_size, dtype=self.identity.dtype))
            errors.append(self._failed(outcome, session_id, owner))
        self.metrics.steps.labels("step").inc(errors.count(None))
        reply = WireTensor.from_torch(torch.cat(outputs), message.hidden.codec)  # replies mirror the request's codec
        return StepGroupResult.trusted(type="step_group_result", hidden=reply, errors=errors)

    async def _group_member(self, session_id: str, owner: int, group: StepInputs, rows: slice) -> torch.Tensor:
        session = self.sessions.get(session_id, owner)
        inputs = validate_group_member(
            session, StepInputs(group.hidden[rows], group.position_ids[rows], group.attention_mask[rows], None)
        )
        session.last_used = time.monotonic()
        output = await self.batcher.submit(session, inputs)
        return output.to("cpu", self.identity.dtype)

    async def _forward(self, message: Forward) -> ForwardResult:
        span = self._ready_span()
        check_layer_range(message.start, message.end, (span.start, span.end))
        hidden = decode_hidden(message.hidden, self.identity.hidden_size, self.settings.max_batch_size)
        shape = (hidden.shape[0], hidden.shape[1])
        positions = decode_positions(message.position_ids, shape, self.settings.max_length)
        mask = decode_mask(message.attention_mask, shape)
        out = await self._compute(span.forward_stateless, hidden, positions, mask, message.start, message.end)
        self.metrics.steps.labels("forward").inc()
        return ForwardResult(hidden=WireTensor.from_torch(out, message.hidden.codec))

    def expire_sessions(self) -> None:
        settings = self.settings
        for session_id in self.sessions.expire(
            time.monotonic(), settings.session_idle_timeout, settings.max_session_seconds
        ):
            log.info("session %s expired (idle or past its maximum age)", session_id)

    async def _compute(self, function: Callable[..., T], *args: object, quick: bool = False) -> T:
        """Run on the compute thread, bounded by `--step-timeout` (the step's session then ends).

        `quick` work (a lone single-token step) runs right here on the event loop instead, while the compute
        thread is idle and such work has lately taken under `INLINE_SECONDS`: handing it to the thread and
        back costs more than a small model's decode step itself, and blocking the loop that briefly delays
        nothing that matters."""
        began = time.perf_counter()
        if quick and self._runs_inline():
            result = function(*args)
        else:
            future = asyncio.get_running_loop().run_in_executor(self.compute, function, *args)
            self._computing += 1
            future.add_done_callback(self._computed)  # when the thread is done, even with a step that timed out
            try:
                async with asyncio.timeout(self.settings.step_timeout):
                    result = await asyncio.shield(future)
            except TimeoutError:
                raise ProtocolError("internal", f"step took longer than {self.settings.step_timeout:g} s") from None
        took = time.perf_counter() - began
        if quick:
            self._quick_seconds += 0.2 * (took - self._quick_seconds)
        self.metrics.step_seconds.observe(took)
        return result

    def _runs_inline(self) -> bool:
        """Whether quick work would run right on the event loop now (see `_compute`)."""
        return not self._computing and self._quick_seconds < INLINE_SECONDS

    def _computed(self, future: asyncio.Future[object]) -> None:
        self._computing -= 1
        if not future.cancelled():
            future.exception()  # a step that timed out may fail later; nobody awaits it any more

    def http_routes(self) -> dict[str, Route]:
        return {
            "/metrics": lambda: (PROMETHEUS_CONTENT_TYPE, self.metrics.render()),
            "/healthz": lambda: ("text/plain; charset=utf-8", f"{self.state}\n".encode()),
        }


def check_session_size(max_length: int, batch_size: int, settings: NodeSettings) -> None:
    if max_length > settings.max_length:
        raise ProtocolError(
            "bad_request", f"max_length {max_length} exceeds this node's limit of {settings.max_length}"
        )
    if batch_size > settings.max_batch_size:
        raise ProtocolError(
            "bad_request", f"batch_size {batch_size} exceeds this node's limit of {settings.max_batch_size}"
        )
