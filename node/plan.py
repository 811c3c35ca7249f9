"""Which layers a node hosts: the user's range, or (`--layers auto`) as many as fit in its memory
budget, placed on the least-covered run of layers in the swarm. Pure: takes values, returns a plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swarm.errors import SwarmError, format_layer_range
from swarm.memory import ModelFootprint, format_bytes
from swarm.protocol import PeerInfo
from swarm.routing import least_covered_span
from swarm.settings import parse_layer_range


@dataclass(frozen=True)
class SpanPlan:
    start: int
    end: int
    weight_bytes: int
    cache_bytes: int
    budget: int | None

    def describe(self, num_layers: int, dtype: str, cache_tokens: int) -> str:
        budget = f" of a {format_bytes(self.budget)} budget" if self.budget else ""
        return (
            f"plan: layers {format_layer_range(self.start, self.end)} ({self.end - self.start} of {num_layers}), "
            f"{format_bytes(self.weight_bytes)} of {dtype} weights + {format_bytes(self.cache_bytes)} KV cache for "
            f"{cache_tokens} tokens = {format_bytes(self.weight_bytes + self.cache_bytes)}{budget}"
        )


def plan_span(
    footprint: ModelFootprint,
    layers: str,
    budget: int | None,
    dtype: str,
    cache_tokens: int,
    peers: Sequence[PeerInfo],
) -> SpanPlan:
    """Resolve `--layers` (a range or `auto`) against `--max-memory`; refuse plans that cannot fit."""
    per_layer = footprint.layer_bytes(dtype) + cache_tokens * footprint.kv_bytes_per_token(dtype)
    if layers.strip().lower() == "auto":
        if budget is None:
            raise SwarmError("--layers auto needs a memory budget (--max-memory)")
        count = footprint.layers_that_fit(budget, dtype, cache_tokens)
        if count == 0:
            raise SwarmError(
                f"not even one layer fits in {format_bytes(budget)}: a layer needs {format_bytes(per_layer)} "
                f"({dtype} weights + KV cache for {cache_tokens} tokens); raise --max-memory or lower --cache-tokens"
            )
        start, end = least_covered_span(peers, footprint.num_layers, count)
    else:
        start, end = parse_layer_range(layers)
        if end > footprint.num_layers:
            raise SwarmError(
                f"--layers {format_layer_range(start, end)} is outside the model's {footprint.num_layers} layers "
                f"(0-{footprint.num_layers - 1})"
            )
        if budget is not None and (end - start) * per_layer > budget:
            raise SwarmError(
                f"layers {format_layer_range(start, end)} need {format_bytes((end - start) * per_layer)}, more than "
                f"--max-memory {format_bytes(budget)}; host fewer layers or use --layers auto"
            )
    span = end - start
    cache_bytes = cache_tokens * footprint.kv_bytes_per_token(dtype) * span
    return SpanPlan(start, end, span * footprint.layer_bytes(dtype), cache_bytes, budget)
