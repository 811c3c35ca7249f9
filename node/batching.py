"""Running concurrent sessions' decode steps as one batched forward over the node's span.

Steps that arrive while the compute thread is busy queue up; the next round takes them all, and
those that are plain single-token decode steps over the same layers run together: their caches are
left-padded into one batch cache (padding masked out) and the span runs once. Each session's cache
then becomes a view of its rows of that batch cache, so when the same sessions step together again
(a client's concurrent generations, tick after tick) the merge is skipped; a session that steps alone
or leaves the batch gets caches of its own again. Everything else (prefills, beam reorders, caches of
other layer types) runs alone, exactly as before.

A step longer than `chunk_tokens` (`--prefill-chunk`) runs one chunk per round: after each chunk it
goes back in the queue behind the steps that arrived meanwhile, so a long prompt delays other
sessions' decode steps by one chunk, not by the whole prompt. Its reply is the chunks' outputs
joined along the token dimension. A step that fails, whole or in any chunk, leaves its session as it
was before the step (`SessionCheckpoint`). A session's steps run in the order they were submitted.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from node.chunking import ChunkedStep, SessionCheckpoint
from node.sessions import Session
from node.span import LoadedSpan
from node.validation import StepInputs
from swarm.errors import ProtocolError
from swarm.transformers_compat import fill_cache_layer, is_dynamic_layer, new_cache_layer

log = logging.getLogger("swarm.node")

QUICK_ROWS = 8
"""A lone decode step of at most this many rows may run without the hop to the compute thread."""

QUICK_BATCH_ROWS = 64
"""A batched round of decode steps with at most this many rows together may also skip that hop."""

PADDING_SLACK = 1.25
"""Batched sessions keep views into the round's merged cache only while its left padding makes it at most
this much larger than their own caches together: the views keep the padding alive."""


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
        return _apply(span, session, inputs)
    except BaseException:
        checkpoint.restore(session)
        raise


def run_next_chunk(span: LoadedSpan, session: Session, step: ChunkedStep) -> torch.Tensor | None:
    """The next chunk of a long step; after the last one, the whole step's output (joined here, on the
    compute thread, rather than on the event loop)."""
    step.outputs.append(run_alone(span, session, step.next_chunk, step.checkpoint))
    return torch.cat(step.outputs, dim=1) if step.finished else None


def _apply(span: LoadedSpan, session: Session, inputs: StepInputs) -> torch.Tensor:
    if inputs.hypo_ids is not None:
        session.cache.reorder_cache(inputs.hypo_ids.to(span.device))
        session.attention_mask = session.attention_mask[inputs.hypo_ids]
        if session.last_positions is not None:
            session.last_positions = session.last_positions[inputs.hypo_ids]
    mask = torch.cat([session.attention_mask, inputs.attention_mask], dim=1)
    hidden = span.forward(inputs.hidden, inputs.position_ids, mask, session.cache, session.start, session.end)
    _advance(session, mask, inputs)
    return hidden


class SharedCaches:
    """Which sessions hold views into which merged cache (by the storage of its first layer's keys), so that
    when some of them move to a new merged cache, the others get caches of their own: an idle session must
    not keep a whole batch's cache alive. Only `run_batched` touches it, and rounds never overlap."""

    def __init__(self) -> None:
        self._members: dict[int, list[weakref.ref[Session]]] = {}

    def leaving(self, sessions: Sequence[Session], layer: int) -> None:
        """`sessions` are about to step together, after which they hold views into a new merged cache or tensors
        of their own: whoever else shared their old merged caches moves out, and those caches are forgotten."""
        moving = {id(session) for session in sessions}
        for session in sessions:
            keys = session.cache.layers[layer].keys  # type: ignore[attr-defined]
            for ref in self._members.pop(keys.untyped_storage().data_ptr(), []):
                other = ref()
                if other is not None and id(other) not in moving:
                    _own_copies(other)

    def share(self, sessions: Sequence[Session], keys: torch.Tensor) -> None:
        """`sessions` (just out of `leaving`) now hold views into the merged cache whose first keys are `keys`."""
        self._members = {ptr: refs for ptr, refs in self._members.items() if any(ref() for ref in refs)}
        self._members[keys.untyped_storage().data_ptr()] = [weakref.ref(session) for session in sessions]


def run_batched(span: LoadedSpan, steps: list[PendingStep], shared: SharedCaches | None = None) -> list[torch.Tensor]:
    """One forward for several sessions' single-token steps over the same layers.

    The sessions' caches are merged into one left-padded batch cache, unless they are still the views this
    function left them last round over the same rows (the same sessions stepping together again): then that
    round's merged cache is used as it is. Afterwards each session's cache becomes a view of its rows of the
    new merged cache, unless padding would make those views hold much more than the sessions' own caches
    (`PADDING_SLACK`); then each session's new keys and values are appended to its own cache instead.
    `shared` tracks who shares which merged cache across calls (see `SharedCaches`)."""
    shared = shared if shared is not None else SharedCaches()
    start, end = steps[0].group
    longest = max(step.session.length for step in steps)
    rows = sum(step.session.batch_size for step in steps)
    resident = [_resident(steps, index, rows, longest) for index in range(start, end)]
    shared.leaving([step.session for step in steps], start)
    cache = DynamicCache()  # can_batch: every layer it gets is a DynamicLayer (built from the config, it costs 0.25 ms)
    cache.layers = [new_cache_layer() for _ in range(end)]
    for index, reused in zip(range(start, end), resident, strict=True):
        fill_cache_layer(cache.layers[index], *(reused or _merged(steps, index, longest)))
    mask = torch.zeros(rows, longest + 1, dtype=torch.bool)  # left padding stays masked out
    mask[:, -1:] = torch.cat([step.inputs.attention_mask for step in steps])
    row = 0
    for step in steps:
        session = step.session
        mask[row : row + session.batch_size, longest - session.length : longest] = session.attention_mask
        row += session.batch_size
    hidden = span.forward(
        torch.cat([s.inputs.hidden.to(span.dtype) for s in steps]),
        torch.cat([s.inputs.position_ids for s in steps]),
        mask,
        cache,
        start,
        end,
    )
    own_tokens = sum(step.session.batch_size * (step.session.length + 1) for step in steps)
    as_views = rows * (longest + 1) <= PADDING_SLACK * own_tokens and all(
        cache.layers[index].keys.is_contiguous() and cache.layers[index].values.is_contiguous()
        for index in range(start, end)
    )
    outputs, row = [], 0
    for step in steps:
        session = step.session
        rows_of = slice(row, row + session.batch_size)
        _advance(session, mask[rows_of, longest - session.length :], step.inputs)  # its old mask and the new token
        for index in range(start, end):
            merged, own = cache.layers[index], session.cache.layers[index]
            if as_views:
                own.keys = merged.keys[rows_of, :, -session.length :]
                own.values = merged.values[rows_of, :, -session.length :]
            else:
                own.update(merged.keys[rows_of, :, -1:], merged.values[rows_of, :, -1:])
        outputs.append(hidden[rows_of])
        row += session.batch_size
    if as_views:
        shared.share([step.session for step in steps], cache.layers[start].keys)
    return outputs


def _merged(steps: list[PendingStep], index: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = zip(*(_padded(step.session.cache.layers[index], longest) for step in steps), strict=True)
    return torch.cat(keys), torch.cat(values)


def _resident(
    steps: list[PendingStep], index: int, rows: int, longest: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Layer `index`'s merged keys and values of the previous round, if every step's session cache is still
    exactly the view of its rows that `run_batched` left (same sessions, same order, nothing stepped alone
    or rolled back since); None otherwise. (Inference tensors do not record `_base`, so the merged tensors
    are found from the views' storage.)"""
    first = steps[0].session.cache.layers[index]
    keys, values = _whole(first.keys, rows, longest), _whole(first.values, rows, longest)
    if keys is None or values is None:
        return None
    heads, dim = keys.shape[1], keys.shape[3]
    row_bytes, token_bytes = heads * longest * dim * keys.element_size(), dim * keys.element_size()
    row = 0
    for step in steps:
        layer, session = step.session.cache.layers[index], step.session
        shape = (session.batch_size, heads, session.length, dim)
        offset = row * row_bytes + (longest - session.length) * token_bytes  # of rows[row:], tokens[-length:]
        for view, whole in ((layer.keys, keys), (layer.values, values)):
            if (
                view.shape != shape
                or view.stride() != whole.stride()
                or view.data_ptr() != whole.data_ptr() + offset
                or view.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
            ):
                return None
        row += session.batch_size
    return keys, values


def _whole(view: torch.Tensor, rows: int, length: int) -> torch.Tensor | None:
    """The contiguous [rows, heads, length, head_dim] tensor that `view` was cut from, if its storage holds
    exactly that many values."""
    if view.dim() != 4:
        return None
    heads, dim = view.shape[1], view.shape[3]
    if view.untyped_storage().nbytes() != rows * heads * length * dim * view.element_size():
        return None
    return view.as_strided((rows, heads, length, dim), (heads * length * dim, length * dim, dim, 1), 0)


def _own_copies(session: Session) -> None:
    """Give a session that left a batch its own cache tensors instead of views into the batch's."""
    for layer in session.cache.layers[session.start : session.end]:  # type: ignore[attr-defined]
        if is_dynamic_layer(layer) and _is_slice(layer.keys):
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()


def _is_slice(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()


def can_batch(steps: list[PendingStep]) -> bool:
    if len(steps) < 2:
        return False
    start, end = steps[0].group
    return all(is_dynamic_layer(step.session.cache.layers[index]) for step in steps for index in range(start, end))


def _padded(layer: object, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = length - layer.keys.shape[-2]
    if not missing:
        return layer.keys, layer.values
    return (
        torch.nn.functional.pad(layer.keys, (0, 0, missing, 0)),
        torch.nn.functional.pad(layer.values, (0, 0, missing, 0)),
    )


def _advance(session: Session, mask: torch.Tensor, inputs: StepInputs) -> None:
    session.attention_mask = mask
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
        self._shared = SharedCaches()

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
                outputs = await self._compute(run_batched, span, group, self._shared, quick=quick)
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
