"""Scaled dot-product attention over stored keys, with the masks every family needs.

Keys live in slots (a session's cache, or just the step's own tokens); a query attends to the valid slots up to
its own (causal), within the sliding window if the family has one, plus an ALiBi bias from the keys' positions.
A padding query also sees its own slot, so that no row is fully masked: its output is never used, but a NaN
there would be written to the cache and poison later steps (0 * NaN is NaN).
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


def attention_mask(
    spec: ModelSpec,
    key_valid: torch.Tensor,
    query_slots: torch.Tensor,
    dtype: torch.dtype,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mask for queries at `query_slots` [batch, queries] over keys in slots 0..T-1 (`key_valid` [batch, T]):
    boolean [batch, 1, queries, T], or with ALiBi an additive float [batch, heads, queries, T] built from the keys'
    positions `key_positions` [batch, T]."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    queries = query_slots[:, :, None]
    allowed = key_valid[:, None, :] & (slots <= queries)
    if spec.sliding_window is not None:
        allowed &= slots > queries - spec.sliding_window
    allowed |= slots == queries
    if not spec.alibi:
        return allowed[:, None]
    if key_positions is None:
        raise ValueError("ALiBi needs the keys' positions")
    slopes = alibi_slopes(spec.num_heads).to(key_valid.device)
    bias = (slopes[:, None] * key_positions[:, None, :].float()).to(dtype) * spec.alibi_scale
    return bias[:, :, None, :].masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [batch, heads, queries, dim] over k, v [batch, kv_heads, T, dim] (grouped-query heads share them)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class StatelessAttention:
    """Attention over the step's own tokens only (a `forward` without a session): nothing is stored."""

    def __init__(self, spec: ModelSpec, padding: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> None:
        tokens = padding.shape[1]
        slots = torch.arange(tokens, device=padding.device).expand(padding.shape[0], tokens)
        self.mask = attention_mask(spec, padding, slots, dtype, positions)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return attend(q, k, v, self.mask, scale)
