"""Long steps in bounded chunks, and undoing a step that fails part-way.

A prompt of thousands of tokens arrives as one step. Computed at once, it holds the compute thread
for the whole prompt while every other session's decode step waits. Split into chunks of at most
`--prefill-chunk` tokens, each attending to what the chunks before it left in the cache, it gives
the same hidden states (up to float rounding) and lets the batcher run other steps in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swarm.node.sessions import Session
from swarm.node.validation import StepInputs


@dataclass(frozen=True)
class SessionCheckpoint:
    """What a step changes on a session, kept so that a failed step (or chunk of one) is undone exactly.

    The cache needs little more than the length: a step only writes slots past it, which are hidden from
    attention again when the length is set back. A beam reorder moves rows, so a step that starts with one
    keeps a copy of the session's rows."""

    length: int
    last_positions: torch.Tensor | None
    rows: tuple[torch.Tensor, ...] | None

    @classmethod
    def of(cls, session: Session, reorders: bool) -> SessionCheckpoint:
        """Before a step on `session`; `reorders`: the step starts with a beam reorder (`hypo_ids`)."""
        rows = session.cache.saved() if reorders else None  # type: ignore[attr-defined]
        return cls(session.length, session.last_positions, rows)

    def restore(self, session: Session) -> None:
        session.length = self.length
        session.last_positions = self.last_positions
        if self.rows is not None:
            session.cache.restore(self.rows)  # type: ignore[attr-defined]
        session.cache.truncate(self.length)  # type: ignore[attr-defined]


def split_step(inputs: StepInputs, size: int) -> list[StepInputs]:
    """Consecutive pieces of at most `size` new tokens (views, no copies); a beam reorder goes with the first."""
    tokens = inputs.hidden.shape[1]
    return [
        StepInputs(
            inputs.hidden[:, begin : begin + size],
            inputs.position_ids[:, begin : begin + size],
            inputs.attention_mask[:, begin : begin + size] if inputs.attention_mask is not None else None,
            inputs.hypo_ids if begin == 0 else None,
        )
        for begin in range(0, tokens, size)
    ]


@dataclass
class ChunkedStep:
    """A long step part-way through: its chunks, the outputs of those already run, and the session before it."""

    checkpoint: SessionCheckpoint
    chunks: list[StepInputs]
    outputs: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def start(cls, session: Session, inputs: StepInputs, size: int) -> ChunkedStep:
        return cls(SessionCheckpoint.of(session, inputs.hypo_ids is not None), split_step(inputs, size))

    @property
    def next_chunk(self) -> StepInputs:
        return self.chunks[len(self.outputs)]

    @property
    def finished(self) -> bool:
        return len(self.outputs) == len(self.chunks)
