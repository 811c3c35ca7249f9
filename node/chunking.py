"""Long steps in bounded chunks, and undoing a step that fails part-way.

A prompt of thousands of tokens arrives as one step. Computed at once, it holds the compute thread
for the whole prompt while every other session's decode step waits. Split into chunks of at most
`--prefill-chunk` tokens, each attending to what the chunks before it left in the cache, it gives
the same hidden states (up to float rounding) and lets the batcher run other steps in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from node.sessions import Session
from node.validation import StepInputs
from swarm.transformers_compat import cache_layer_state, is_dynamic_layer, restore_cache_layer_state


@dataclass(frozen=True)
class LayerCheckpoint:
    """One cache layer's attributes before a step. `DynamicCache` layers replace their tensors on every
    change (`torch.cat` on update, `index_select` on a beam reorder, slicing on crop) instead of
    writing into them, so keeping the attributes copies nothing. A full-attention layer that the step
    only appends to keeps just its length, so the old tensors are freed as usual; `restore` cuts the
    new ones back to it. Sliding-window layers drop old tokens and reorders move rows: those keep
    their old tensors for the length of the step."""

    attributes: dict[str, object]
    length: int | None = None

    @classmethod
    def of(cls, layer: object, keep_tensors: bool) -> LayerCheckpoint:
        attributes = cache_layer_state(layer)
        if keep_tensors or not is_dynamic_layer(layer):
            return cls(attributes)
        del attributes["keys"], attributes["values"]
        return cls(attributes, layer.keys.shape[-2])

    def restore(self, layer: object) -> None:
        keys, values = layer.keys, layer.values  # type: ignore[attr-defined]
        restore_cache_layer_state(layer, self.attributes)
        if self.length is not None:
            layer.keys, layer.values = keys[..., : self.length, :], values[..., : self.length, :]


@dataclass(frozen=True)
class SessionCheckpoint:
    """What a step changes on a session, kept so that a failed step (or chunk of one) is undone exactly:
    unlike `crop`, this also undoes a beam reorder and a sliding window that dropped old tokens."""

    length: int
    attention_mask: torch.Tensor
    last_positions: torch.Tensor | None
    layers: tuple[LayerCheckpoint, ...]

    @classmethod
    def of(cls, session: Session, reorders: bool) -> SessionCheckpoint:
        """Before a step on `session`; `reorders`: the step starts with a beam reorder (`hypo_ids`)."""
        layers = tuple(LayerCheckpoint.of(layer, reorders) for layer in _span_layers(session))
        return cls(session.length, session.attention_mask, session.last_positions, layers)

    def restore(self, session: Session) -> None:
        session.length = self.length
        session.attention_mask = self.attention_mask
        session.last_positions = self.last_positions
        for layer, saved in zip(_span_layers(session), self.layers, strict=True):
            saved.restore(layer)


def _span_layers(session: Session) -> list[object]:
    """The cache layers a session's steps touch (its cache has one per model layer)."""
    return session.cache.layers[session.start : session.end]  # type: ignore[attr-defined]


def split_step(inputs: StepInputs, size: int) -> list[StepInputs]:
    """Consecutive pieces of at most `size` new tokens (views, no copies); a beam reorder goes with the first."""
    tokens = inputs.hidden.shape[1]
    return [
        StepInputs(
            inputs.hidden[:, begin : begin + size],
            inputs.position_ids[:, begin : begin + size],
            inputs.attention_mask[:, begin : begin + size],
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
