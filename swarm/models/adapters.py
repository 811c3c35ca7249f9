"""Low-rank adapters (LoRA) on a layer's attention projections, applied per session rather than merged.

An adapter adds `scale * B(A(x))` to the output of a layer's fused query-key-value projection (`qkv`) and/or its
attention output projection (`out`), with A [rank, in] and B [out, rank] and `scale = alpha / rank`. The node's
weights stay as they are: a session (or a stateless pass) brings its adapter, and only its own rows get the
low-rank term, so sessions with different adapters, or none, still share one batched forward. `qkv`'s rows follow
swarm's fused layout (all query heads, then key heads, then value heads), the same for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.models.spec import ModelSpec

TARGETS = ("qkv", "out")
"""The projections an adapter may target, by their names in `swarm.models.block.DecoderLayer`."""


def target_shape(spec: ModelSpec, target: str) -> tuple[int, int]:
    """(in features, out features) of a targeted projection."""
    qkv_out = spec.q_size + 2 * spec.num_kv_heads * spec.head_dim
    shapes = {"qkv": (spec.hidden_size, qkv_out), "out": (spec.q_size, spec.hidden_size)}
    return shapes[target]


@dataclass(frozen=True)
class LowRank:
    """One projection's adapter: A [rank, in], B [out, rank]."""

    a: torch.Tensor
    b: torch.Tensor

    def delta(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """What the adapter adds to the projection of `x` [..., in], in `x`'s dtype."""
        return (x @ self.a.to(x.dtype).T) @ (self.b.to(x.dtype).T * scale)


@dataclass(frozen=True)
class LayerAdapters:
    """An adapter's low-rank pairs, keyed by (layer index, target), and its scale (alpha / rank)."""

    scale: float
    pairs: dict[tuple[int, str], LowRank]

    def get(self, layer: int, target: str) -> LowRank | None:
        return self.pairs.get((layer, target))

    def tensors(self) -> list[torch.Tensor]:
        return [tensor for pair in self.pairs.values() for tensor in (pair.a, pair.b)]


@dataclass(frozen=True)
class RowAdapter:
    """The adapter of rows [first, last) of a forward's batch."""

    first: int
    last: int
    adapters: LayerAdapters


def adapted(projected: torch.Tensor, x: torch.Tensor, layer: int, target: str, rows: list[RowAdapter]) -> torch.Tensor:
    """`projected` (the projection of `x`, both [batch, tokens, ...]) plus the low-rank term of each adapted row
    range. One adapter over the whole batch (a training pass) adds out of place, so autograd sees it plainly; a
    round mixing sessions adds into its rows."""
    for row in rows:
        pair = row.adapters.get(layer, target)
        if pair is None:
            continue
        if row.first == 0 and row.last == projected.shape[0]:
            projected = projected + pair.delta(x, row.adapters.scale)
        else:
            projected[row.first : row.last] += pair.delta(x[row.first : row.last], row.adapters.scale)
    return projected
