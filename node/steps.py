"""A step, from the frame to the reply: decode -> validate -> schedule -> forward -> encode.

Every step frame goes this one way, whether it carries one session or a whole tick of a client's sessions.
The frame's tensors are decoded and checked once; each session's rows are checked against that session, and a
bad one ends only its own session. The rows then wait for the next round: `StepScheduler` runs rounds on the
event loop, one after the other. A round takes the oldest waiting step of every session (a session's steps run
in the order they came); single-token steps over the same layers run as one batched forward over the sessions'
cache rows, whatever their lengths (`swarm.node.kv_cache`), the rest alone. A step longer than `--prefill-chunk`
tokens runs one chunk per round, so other sessions' decode steps come in between. Between rounds the loop reads
whatever frames arrived meanwhile: they make up the next round. The reply stacks the sessions' outputs in the
frame's order, in the codec the request used.

Rounds run on the event loop itself, never on another thread: handing each round to a thread and back cost
more than a small model's decode step, and a round is bounded (`--prefill-chunk`), so heartbeats still go out
between rounds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from swarm.errors import ErrorCode, PeerUnreachableError, ProtocolError, RemoteError
from swarm.models.adapters import RowAdapter
from swarm.node.chunking import ChunkedStep, SessionCheckpoint
from swarm.node.kv_cache import RoundEntry
from swarm.node.metrics import NodeMetrics
from swarm.node.relay import RelayLinks
from swarm.node.sessions import Session, SessionTable
from swarm.node.span import LoadedSpan
from swarm.node.validation import StepInputs, cut_back, decode_step, position_limit, session_rows
from swarm.protocol import Error, Step, StepResult, WireTensor

log = logging.getLogger("swarm.node")

Outcome = torch.Tensor | Exception


# --- decode, validate, encode -------------------------------------------------------------------------------------


class StepService:
    """Answers step frames for one node: the sessions it holds, its span (None while it is not taking work), and
    what to do with a session whose step failed (`end_session`: the server ends it and counts the error).

    A relayed step (node-to-node forwarding, `swarm.node.relay`) comes from the previous node of a client's chain
    with the session's `relay_key`; its answer goes to the session's owner (`deliver`), and a step with a `relay`
    goes on to the next node (`relays`) before its answer goes out."""

    def __init__(
        self,
        sessions: SessionTable,
        span: Callable[[], LoadedSpan],
        scheduler: StepScheduler,
        end_session: Callable[[Exception, str, int], Error],
        hidden_size: int,
        dtype: torch.dtype,
        max_length: int,
        metrics: NodeMetrics,
        relays: RelayLinks | None = None,
        deliver: Callable[[int, StepResult], Awaitable[None]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.span = span
        self.scheduler = scheduler
        self.end_session = end_session
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_length = max_length
        self.metrics = metrics
        self.relays = relays
        self.deliver = deliver

    async def answer(self, message: Step, owner: int) -> StepResult | None:
        """Every session's rows of the step, each run or failed on its own; None when the answer went to the
        session's owner (a relayed step). Nothing awaits before the rows are scheduled, so the steps of a
        connection are scheduled in the order their frames arrived."""
        on_behalf = message.relay_key is not None
        if on_behalf:
            try:
                owner = self.sessions.get_relayed(message.session_ids[0], message.relay_key).owner  # type: ignore[arg-type]
            except ProtocolError as exc:  # refused to the peer that sent it: the owner is not told of probes
                return self._reply(message, owner, [exc])
        result = await self._compute(message, owner)
        if message.relay is not None:
            result = await self._forward(message, result)
        if on_behalf and self.deliver is not None:
            await self.deliver(owner, result)
            return None
        return result

    async def _forward(self, message: Step, result: StepResult) -> StepResult:
        """Send the step's output on to the next node of its relay; the result says if that failed."""
        if result.errors is not None or not message.relay:
            return result  # the step failed here: the client goes on from here itself
        hop, rest = message.relay[0], message.relay[1:]
        onward = Step.trusted(
            type="step",
            step_id=hop.step_id,
            session_ids=[hop.session_id],
            rows=message.rows,
            hidden=result.hidden,
            position_ids=message.position_ids,
            attention_mask=message.attention_mask,
            hypo_ids=message.hypo_ids,
            lengths=[hop.length] if hop.length is not None else None,
            relay=rest or None,
            relay_key=hop.relay_key,
        )
        try:
            if self.relays is None:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "this node does not forward steps")
            await self.relays.forward(hop.address, onward)
        except (ProtocolError, PeerUnreachableError, RemoteError) as exc:
            code = exc.code if isinstance(exc, (ProtocolError, RemoteError)) else ErrorCode.BUSY
            log.info("could not forward a step to %s: %s", hop.address, exc)
            self.metrics.relays.labels("failed").inc()
            failed = Error(code=code, message=f"forwarding to {hop.address} failed: {exc}"[:4096], step_id=hop.step_id)
            return StepResult.trusted(
                type="step_result", step_id=result.step_id, hidden=result.hidden, relay_error=failed
            )
        self.metrics.relays.labels("sent").inc()
        return result

    async def _compute(self, message: Step, owner: int) -> StepResult:
        outcomes: list[Outcome]
        try:
            span = self.span()  # refuses the whole frame unless the node takes work
            inputs = decode_step(message, self.hidden_size, position_limit(span.architecture.spec, self.max_length))
        except ProtocolError as exc:  # nothing in the frame can run: every session's step failed
            outcomes = [exc] * len(message.session_ids)
        else:
            waiting, first = [], 0
            lengths = message.lengths or [None] * len(message.session_ids)
            for session_id, count, length in zip(message.session_ids, message.rows, lengths, strict=True):
                waiting.append(self._schedule(session_id, owner, inputs, slice(first, first + count), length))
                first += count
            outcomes = [await _outcome(waiting[0])] if len(waiting) == 1 else await _outcomes(waiting)
        return self._reply(message, owner, outcomes)

    def _schedule(
        self, session_id: str, owner: int, inputs: StepInputs, rows: slice, cut_to: int | None
    ) -> asyncio.Future[torch.Tensor]:
        try:
            session = self.sessions.get(session_id, owner)
            own = session_rows(session, inputs, rows, cut_to)
        except ProtocolError as exc:
            failed: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed
        session.last_used = time.monotonic()
        session.stepped = True
        return self.scheduler.submit(session, own)

    def _reply(self, message: Step, owner: int, outcomes: list[Outcome | BaseException]) -> StepResult:
        outputs: list[torch.Tensor] = []
        errors: list[Error | None] = []
        for session_id, count, outcome in zip(message.session_ids, message.rows, outcomes, strict=True):
            if isinstance(outcome, torch.Tensor):
                outputs.append(outcome)
                errors.append(None)
                continue
            if not isinstance(outcome, Exception):  # cancelled: the connection is going away
                raise outcome
            tokens = message.hidden.shape[1] if len(message.hidden.shape) == 3 else 1
            outputs.append(torch.zeros(count, tokens, self.hidden_size, dtype=self.dtype))
            errors.append(self.end_session(outcome, session_id, owner))
        self.metrics.steps.labels("step").inc(errors.count(None))
        hidden = outputs[0] if len(outputs) == 1 else torch.cat([output.to(self.dtype) for output in outputs])
        return StepResult.trusted(
            type="step_result",
            step_id=message.step_id,
            hidden=WireTensor.from_torch(hidden, message.hidden.codec),  # replies mirror the request's codec
            errors=None if errors.count(None) == len(errors) else errors,
        )


async def _outcome(waiting: asyncio.Future[torch.Tensor]) -> Outcome:
    try:
        return await waiting
    except Exception as exc:  # this session's step failed; the reply says so
        return exc


async def _outcomes(waiting: list[asyncio.Future[torch.Tensor]]) -> list[Outcome]:
    return list(await asyncio.gather(*waiting, return_exceptions=True))  # type: ignore[arg-type]


# --- schedule and forward -----------------------------------------------------------------------------------------


@dataclass
class PendingStep:
    session: Session
    inputs: StepInputs
    done: asyncio.Future[torch.Tensor] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    chunked: ChunkedStep | None = None

    @property
    def batchable(self) -> bool:
        return self.inputs.hidden.shape[1] == 1 and self.inputs.hypo_ids is None and self.session.length > 0

    @property
    def group(self) -> tuple[int, int]:
        return self.session.start, self.session.end


class StepScheduler:
    """Runs waiting steps in rounds on the event loop. `batching` off: every step runs alone; `chunk_tokens`:
    steps longer than this run in chunks, one per round (0: never cut)."""

    def __init__(
        self, span: Callable[[], LoadedSpan], metrics: NodeMetrics, batching: bool = True, chunk_tokens: int = 256
    ) -> None:
        self._span = span
        self._metrics = metrics
        self.batching = batching
        self.chunk_tokens = chunk_tokens
        self._waiting: dict[int, deque[PendingStep]] = {}  # by id(session), oldest session first
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def submit(self, session: Session, inputs: StepInputs) -> asyncio.Future[torch.Tensor]:
        """The step's output, computed after every step submitted earlier on the same session."""
        pending = PendingStep(session, inputs)
        self._waiting.setdefault(id(session), deque()).append(pending)
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return pending.done

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                self._run_round([steps[0] for steps in self._waiting.values()])
                await asyncio.sleep(0)  # frames that arrived meanwhile join the next round

    def _run_round(self, steps: list[PendingStep]) -> None:
        steps = [step for step in steps if not self._abandoned(step)]
        for step in [step for step in steps if step.session.closed]:  # its rows may belong to another session now
            self._finish(step, ProtocolError(ErrorCode.UNKNOWN_SESSION, "the session ended before this step ran"))
        steps = [step for step in steps if not step.session.closed]
        if not steps:
            return
        try:
            span = self._span()
        except ProtocolError as exc:  # the node stopped taking work while these steps waited
            for step in steps:
                self._finish(step, exc)
            return
        steps = [step for step in steps if self._rolled_back(step)]
        began = time.perf_counter()
        alone: list[PendingStep] = []
        batches: dict[tuple[int, int], list[PendingStep]] = {}
        for step in steps:
            if self.batching and step.batchable:
                batches.setdefault(step.group, []).append(step)
            else:
                alone.append(step)
        for batch in batches.values():  # decode steps first: a long prompt delays them by one chunk at most
            if len(batch) > 1:
                self._run_batch(span, batch)
            else:
                self._run_alone(span, batch[0])
        for step in alone:
            self._run_alone(span, step)
        self._metrics.step_seconds.observe(time.perf_counter() - began)

    def _run_batch(self, span: LoadedSpan, batch: list[PendingStep]) -> None:
        try:
            outputs = run_batched(span, batch)
        except Exception:  # a failure inside the batch is retried one by one, so it ends one session only
            log.exception("batched step failed; running its %d steps one by one", len(batch))
            for step in batch:
                self._run_alone(span, step)
            return
        self._metrics.batched_steps.inc(len(batch))
        for step, output in zip(batch, outputs, strict=True):
            self._finish(step, output)

    def _run_alone(self, span: LoadedSpan, step: PendingStep) -> None:
        try:
            if step.chunked is None and 0 < self.chunk_tokens < step.inputs.hidden.shape[1]:
                step.chunked = ChunkedStep.start(step.session, step.inputs, self.chunk_tokens)
            if step.chunked is None:
                output = run_alone(span, step.session, step.inputs)
            else:  # one chunk per round; the step stays first in its session's line until the last one
                chunked = step.chunked
                chunked.outputs.append(run_alone(span, step.session, chunked.next_chunk, chunked.checkpoint))
                if not chunked.finished:
                    return
                output = torch.cat(chunked.outputs, dim=1)
        except Exception as exc:  # the step (or chunk) already put its session back; only this step fails
            self._finish(step, exc)
            return
        self._finish(step, output)

    def _rolled_back(self, step: PendingStep) -> bool:
        """A step that starts by rolling its session back does so when its turn comes (after the session's
        earlier steps); False when that fails (the step fails with it)."""
        if step.inputs.cut_to is None:
            return True
        length = step.session.length
        try:
            step.inputs = cut_back(step.session, step.inputs)
            self._metrics.rolled_back.inc(length - step.session.length)
        except ProtocolError as exc:
            self._finish(step, exc)
            return False
        return True

    def _finish(self, step: PendingStep, outcome: Outcome) -> None:
        self._leave_line(step)
        if step.done.done():
            return
        if isinstance(outcome, Exception):
            step.done.set_exception(outcome)
        else:
            step.done.set_result(outcome)

    def _leave_line(self, step: PendingStep) -> None:
        line = self._waiting.get(id(step.session))
        if line and line[0] is step:
            line.popleft()
            if not line:
                del self._waiting[id(step.session)]

    def _abandoned(self, step: PendingStep) -> bool:
        """Nobody awaits the step any more (its request was cancelled): it is dropped, and the chunks of it
        already run are undone, so the session's next step finds the session as its client last saw it."""
        if not step.done.cancelled():
            return False
        if step.chunked is not None and not step.session.closed:  # a closed session's rows may be another's now
            step.chunked.checkpoint.restore(step.session)
        self._leave_line(step)
        return True


def run_alone(
    span: LoadedSpan, session: Session, inputs: StepInputs, checkpoint: SessionCheckpoint | None = None
) -> torch.Tensor:
    """Apply one validated step (or chunk of one) to a session's cache; on failure the session goes back to
    `checkpoint`, by default its state before this call."""
    if checkpoint is None:
        checkpoint = SessionCheckpoint.of(session, inputs.hypo_ids is not None)
    try:
        if inputs.hypo_ids is not None:
            session.cache.reorder(inputs.hypo_ids)  # type: ignore[attr-defined]
            if session.last_positions is not None:
                session.last_positions = session.last_positions[inputs.hypo_ids]
        adapters = [RowAdapter(0, session.batch_size, session.adapter)] if session.adapter is not None else None
        hidden = span.run_round(inputs.hidden, [_entry(session, inputs)], session.start, session.end, adapters)
        _advance(session, inputs)
        return hidden
    except BaseException:
        checkpoint.restore(session)
        raise


def run_batched(span: LoadedSpan, steps: list[PendingStep]) -> list[torch.Tensor]:
    """One forward for several sessions' single-token steps over the same layers; each session's output rows.
    A failure leaves every session as it was (their lengths only move once all is done)."""
    start, end = steps[0].group
    hidden = span.run_round(
        torch.cat([step.inputs.hidden for step in steps]),
        [_entry(step.session, step.inputs) for step in steps],
        start,
        end,
        _row_adapters(steps),
    )
    outputs, row = [], 0
    for step in steps:
        _advance(step.session, step.inputs)
        outputs.append(hidden[row : row + step.session.batch_size])
        row += step.session.batch_size
    return outputs


def _row_adapters(steps: list[PendingStep]) -> list[RowAdapter] | None:
    """The row ranges of the sessions in a batch that run with an adapter (None when none does)."""
    rows, first = [], 0
    for step in steps:
        last = first + step.session.batch_size
        if step.session.adapter is not None:
            rows.append(RowAdapter(first, last, step.session.adapter))
        first = last
    return rows or None


def _entry(session: Session, inputs: StepInputs) -> RoundEntry:
    return RoundEntry(session.cache, session.length, inputs.position_ids, inputs.attention_mask)  # type: ignore[arg-type]


def _advance(session: Session, inputs: StepInputs) -> None:
    session.length += inputs.hidden.shape[1]
    session.last_positions = inputs.position_ids[:, -1]
