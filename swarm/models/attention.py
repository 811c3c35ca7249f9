"""Scaled dot-product attention over stored keys, with the masks every family needs, as additive biases.

Keys live in slots (a session's cache, or just the step's own tokens). Each slot has a bias: 0 where it holds a
real token, the dtype's minimum where it holds padding or nothing yet. A query attends to the slots up to its
own (causal), within the sliding window if the family has one, plus an ALiBi bias from the keys' positions.
A decode step's mask is the slots' biases as they are (a view): the slots past a row's length are kept at the
minimum, so causality needs no work. The minimum, not -inf, so that a row with nothing to attend to (a padding
query) averages instead of producing NaN, which would reach the cache and poison later steps (0 * NaN is NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from swarm.models.spec import ModelSpec


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (BLOOM, Falcon), geometric from 2^(-8/n), interleaved beyond a power of two."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


def blocked(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def slot_bias(real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 for real tokens, the minimum for padding."""
    return torch.zeros(real.shape, dtype=dtype, device=real.device).masked_fill_(~real, blocked(dtype))


def needs_full_mask(spec: ModelSpec, queries: int) -> bool:
    """Whether a step's mask must be built (several new tokens, a window, ALiBi) rather than viewed."""
    return queries > 1 or spec.sliding_window is not None or spec.alibi


def full_mask(
    spec: ModelSpec,
    key_bias: torch.Tensor,
    query_slots: torch.Tensor,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The additive mask for queries at `query_slots` [batch, queries] over the slots whose biases are
    `key_bias` [batch, T]: [batch, 1, queries, T], or [batch, heads, queries, T] with ALiBi, which is built
    from the keys' positions `key_positions` [batch, T]."""
    slots = torch.arange(key_bias.shape[1], device=key_bias.device)
    queries = query_slots[:, :, None]
    hidden = slots > queries
    if spec.sliding_window is not None:
        hidden |= slots <= queries - spec.sliding_window
    mask = key_bias[:, None, :].masked_fill(hidden, blocked(key_bias.dtype))
    if not spec.alibi:
        return mask[:, None]
    if key_positions is None:
        raise ValueError("ALiBi needs the keys' positions")
    slopes = alibi_slopes(spec.num_heads).to(key_bias.device)
    alibi = (slopes[:, None] * key_positions[:, None, :].float()).to(key_bias.dtype) * spec.alibi_scale
    return alibi[:, :, None, :] + mask[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [batch, heads, queries, dim] over k, v [batch, kv_heads, T, dim] (grouped-query heads share them)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class StatelessAttention:
    """Attention over the step's own tokens only (a `forward` without a session): nothing is stored."""

    def __init__(self, spec: ModelSpec, padding: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> None:
        tokens = padding.shape[1]
        slots = torch.arange(tokens, device=padding.device).expand(padding.shape[0], tokens)
        self.mask = full_mask(spec, slot_bias(padding, dtype), slots, positions)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return attend(q, k, v, self.mask, scale)
