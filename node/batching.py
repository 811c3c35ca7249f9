"""Running concurrent sessions' decode steps as one batched forward over the node's span.

Steps that arrive while the compute thread is busy queue up; the next round takes them all, and
those that are single-token decode steps over the same layers run together as one forward: the node's
KV cache keeps every session's keys where attention reads them (`node.kv_cache`), so sessions of any
lengths batch without copying their caches. Everything else (prefills, beam reorders) runs alone.

A step longer than `chunk_tokens` (`--prefill-chunk`) runs one chunk per round: after each chunk it
goes back in the queue behind the steps that arrived meanwhile, so a long prompt delays other
sessions' decode steps by one chunk, not by the whole prompt. Its reply is the chunks' outputs
joined along the token dimension. A step that fails, whole or in any chunk, leaves its session as it
was before the step (`SessionCheckpoint`). A session's steps run in the order they were submitted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from node.chunking import ChunkedStep, SessionCheckpoint
from node.kv_cache import RoundEntry
from node.sessions import Session
from node.span import LoadedSpan
from node.validation import StepInputs
from swarm.errors import ProtocolError

log = logging.getLogger("swarm.node")

QUICK_ROWS = 8
"""A lone decode step of at most this many rows may run without the hop to the compute thread."""

QUICK_BATCH_ROWS = 64
"""A batched round of decode steps with at most this many rows together may also skip that hop."""


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
    def quick(self) -> bool:
        """A single-token step of at most `QUICK_ROWS` rows: the kind that may skip the compute thread."""
        return self.inputs.hidden.shape[1] == 1 and self.inputs.hidden.shape[0] <= QUICK_ROWS

    @property
    def group(self) -> tuple[int, int]:
        return self.session.start, self.session.end


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
        hidden = span.run_round(inputs.hidden, [_entry(session, inputs)], session.start, session.end)
        _advance(session, inputs)
        return hidden
    except BaseException:
        checkpoint.restore(session)
        raise


def run_next_chunk(span: LoadedSpan, session: Session, step: ChunkedStep) -> torch.Tensor | None:
    """The next chunk of a long step; after the last one, the whole step's output (joined here, on the
    compute thread, rather than on the event loop)."""
    step.outputs.append(run_alone(span, session, step.next_chunk, step.checkpoint))
    return torch.cat(step.outputs, dim=1) if step.finished else None


def run_batched(span: LoadedSpan, steps: list[PendingStep]) -> list[torch.Tensor]:
    """One forward for several sessions' single-token steps over the same layers; each session's output rows.
    A failure leaves every session as it was (their lengths only move once all is done)."""
    start, end = steps[0].group
    hidden = span.run_round(
        torch.cat([step.inputs.hidden for step in steps]),
        [_entry(step.session, step.inputs) for step in steps],
        start,
        end,
    )
    outputs, row = [], 0
    for step in steps:
        _advance(step.session, step.inputs)
        outputs.append(hidden[row : row + step.session.batch_size])
        row += step.session.batch_size
    return outputs


def can_batch(steps: list[PendingStep]) -> bool:
    return len(steps) >= 2


def _entry(session: Session, inputs: StepInputs) -> RoundEntry:
    return RoundEntry(session.cache, session.length, inputs.position_ids, inputs.attention_mask)  # type: ignore[arg-type]


def _advance(session: Session, inputs: StepInputs) -> None:
    session.length += inputs.hidden.shape[1]
    session.last_positions = inputs.position_ids[:, -1]


class StepBatcher:
    """Queues steps and feeds the compute thread one round at a time: batching what it can, and cutting
    steps longer than `chunk_tokens` into chunks that take turns with other steps (0: never cut).

    A quick step (see `PendingStep.quick`) submitted `alone` that finds nothing queued, no round running and
    nothing ahead of it on its session has nobody to batch with: while `runs_inline()` says `compute` would
    run it at once on the event loop, it runs right in `submit`, skipping the queue and the worker's turn."""

    def __init__(
        self,
        compute: Callable[..., Awaitable[object]],
        span: Callable[[], LoadedSpan],
        on_batch: Callable[[int], None],
        enabled: bool = True,
        chunk_tokens: int = 256,
        runs_inline: Callable[[], bool] = lambda: False,
    ) -> None:
        self._compute = compute
        self._span = span
        self._on_batch = on_batch
        self.enabled = enabled
        self.chunk_tokens = chunk_tokens
        self._runs_inline = runs_inline
        self._queue: asyncio.Queue[PendingStep] = asyncio.Queue()
        self._latest: dict[int, PendingStep] = {}  # by id(session): its last submitted step, which the next awaits
        self._worker: asyncio.Task[None] | None = None
        self._in_round = False

    async def submit(self, session: Session, inputs: StepInputs, alone: bool = False) -> torch.Tensor:
        """The step's output, computed only after every step submitted earlier on the same session.

        `alone`: no other step is being submitted with this one (it came in a frame of its own)."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        pending, key = PendingStep(session, inputs), id(session)
        ahead, self._latest[key] = self._latest.get(key), pending
        queued = False
        try:
            if alone and ahead is None and pending.quick and self._idle() and self._runs_inline():
                queued = True
                await self._run([pending])
                return await pending.done
            if ahead is not None:
                await asyncio.wait([ahead.done])
            self._queue.put_nowait(pending)
            queued = True
            return await pending.done
        finally:
            if not queued:  # cancelled while waiting its turn: the step behind it must not wait forever
                pending.done.cancel()
            if self._latest.get(key) is pending:
                del self._latest[key]

    async def _work(self) -> None:
        while True:
            round_ = [await self._queue.get()]
            while not self._queue.empty():
                round_.append(self._queue.get_nowait())
            self._in_round = True
            try:
                for group in self._groups(round_):
                    await self._run(group)
            finally:
                self._in_round = False

    def _idle(self) -> bool:
        return self._queue.empty() and not self._in_round

    def _groups(self, steps: list[PendingStep]) -> list[list[PendingStep]]:
        groups: dict[tuple[int, int], list[PendingStep]] = {}
        alone: list[list[PendingStep]] = []
        for step in steps:
            if self.enabled and step.batchable:
                groups.setdefault(step.group, []).append(step)
            else:
                alone.append([step])
        return [group for group in groups.values()] + alone

    async def _run(self, group: list[PendingStep]) -> None:
        group = [step for step in group if not _abandoned(step)]
        if not group:
            return
        try:
            span = self._span()
        except ProtocolError as exc:  # the node stopped taking work while these steps waited
            for step in group:
                _fail_waiting(step, exc)
            return
        if can_batch(group):
            try:
                quick = sum(step.session.batch_size for step in group) <= QUICK_BATCH_ROWS
                outputs = await self._compute(run_batched, span, group, quick=quick)
            except ProtocolError as exc:  # the round ran past --step-timeout: every step in it failed
                for step in group:
                    _settle(step, exc)
                return
            except Exception:  # a failure inside the batch is retried one by one, so it ends one session only
                log.exception("batched step failed; running its %d steps one by one", len(group))
            else:
                self._on_batch(len(group))
                for step, output in zip(group, outputs, strict=True):
                    _settle(step, output)
                return
        for step in group:
            if step.chunked is not None or 0 < self.chunk_tokens < step.inputs.hidden.shape[1]:
                await self._run_chunk(span, step)
                continue
            try:
                output = await self._compute(run_alone, span, step.session, step.inputs, quick=step.quick)
            except Exception as exc:  # handed to the step's own request
                _settle(step, exc)
            else:
                _settle(step, output)

    async def _run_chunk(self, span: LoadedSpan, step: PendingStep) -> None:
        """One chunk of a long step; while chunks remain, the step goes back in the queue behind what waits."""
        if step.chunked is None:
            step.chunked = ChunkedStep.start(step.session, step.inputs, self.chunk_tokens)
        try:
            output = await self._compute(run_next_chunk, span, step.session, step.chunked)
        except Exception as exc:  # the chunk already put the session back (past --step-timeout, the session ends)
            _settle(step, exc)
            return
        if output is None:
            self._queue.put_nowait(step)
        else:
            _settle(step, output)


def _abandoned(step: PendingStep) -> bool:
    """Nobody awaits the step any more (its request was cancelled): it is skipped, and the chunks of it
    already run are undone, so the session's next step finds the session as its client last saw it."""
    if not step.done.cancelled():
        return False
    if step.chunked is not None:
        step.chunked.checkpoint.restore(step.session)
    return True


def _fail_waiting(step: PendingStep, error: BaseException) -> None:
    """Fail a step that is not on the compute thread, undoing the chunks it has already run."""
    if step.chunked is not None:
        step.chunked.checkpoint.restore(step.session)
    _settle(step, error)


def _settle(step: PendingStep, outcome: torch.Tensor | BaseException) -> None:
    if step.done.done():
        return
    if isinstance(outcome, BaseException):
        step.done.set_exception(outcome)
    else:
        step.done.set_result(outcome)
