"""Stateless forwards (`forward`): checked, then computed in the node's step rounds over a cache of their own.

A forward is the span's layers over whole sequences, with nothing kept. Computed at once, it held the node's event
loop for as long as it took (attention grows with the square of the length: seconds for a few thousand tokens), and
every session's step waited behind it. Here a forward runs as one-off sessions that no client sees, a few rows at a
time (about `--prefill-chunk` tokens), each split into `--prefill-chunk` token chunks that take their turn in the
rounds like any long step, so a session's step waits for one chunk at most. Their cache rows go back as soon as
they are done. One forward computes at a time and a connection's forwards wait for each other, so the cache they
take beyond `--cache-tokens` is one forward's, at most `--max-forward-tokens`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import torch

from swarm.models.adapters import LayerAdapters
from swarm.node.metrics import NodeMetrics
from swarm.node.sessions import Session
from swarm.node.span import LoadedSpan
from swarm.node.steps import StepScheduler
from swarm.node.validation import PassLimits, StepInputs
from swarm.protocol import Forward, ForwardResult, WireTensor


class ForwardService:
    """Answers `forward` frames for one node: `span` as `StepService` gets it, rounds from `scheduler`."""

    def __init__(
        self, span: Callable[[], LoadedSpan], scheduler: StepScheduler, limits: PassLimits, metrics: NodeMetrics
    ) -> None:
        self.span = span
        self.scheduler = scheduler
        self.limits = limits
        self.metrics = metrics
        self._computing = asyncio.Lock()
        self._connections: dict[int, asyncio.Lock] = {}

    async def answer(self, message: Forward, owner: int) -> ForwardResult:
        span = self.span()
        inputs, adapter = self.limits.decode(message, span.architecture.spec, (span.start, span.end))
        async with self._turn(owner), self._computing:
            hidden = await self._compute(inputs, message.start, message.end, owner, adapter)
        self.metrics.steps.labels("forward").inc()  # its compute time is in the rounds it ran in
        return ForwardResult(hidden=WireTensor.from_torch(hidden, message.hidden.codec))

    def _turn(self, owner: int) -> asyncio.Lock:
        """A connection's forwards one after the other, so one connection cannot queue many ahead of others'."""
        return self._connections.setdefault(owner, asyncio.Lock())

    def forget(self, owner: int) -> None:
        """A connection that went away (its forwards were cancelled with it)."""
        self._connections.pop(owner, None)

    async def _compute(
        self, inputs: StepInputs, start: int, end: int, owner: int, adapter: LayerAdapters | None
    ) -> torch.Tensor:
        batch, tokens = inputs.hidden.shape[:2]
        chunk = self.scheduler.chunk_tokens
        rows = max(1, chunk // tokens) if chunk else batch
        outputs = []
        for first in range(0, batch, rows):
            part = slice(first, first + rows)
            mask = inputs.attention_mask[part] if inputs.attention_mask is not None else None
            piece = StepInputs(inputs.hidden[part], inputs.position_ids[part], mask, None)
            outputs.append(await self._rows(piece, start, end, owner, adapter))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    async def _rows(
        self, inputs: StepInputs, start: int, end: int, owner: int, adapter: LayerAdapters | None
    ) -> torch.Tensor:
        """Some rows of a forward, as a session of their own that is gone once they are computed."""
        batch, tokens = inputs.hidden.shape[:2]
        now = time.monotonic()
        cache = self.span().cache.allocate(batch, tokens)
        session = Session("forward", owner, start, end, tokens, batch, cache, 0, now, now, adapter=adapter)
        try:
            return await self.scheduler.submit(session, inputs)
        finally:
            session.closed = True  # a chunk still waiting must not run on rows given back
            cache.release()
