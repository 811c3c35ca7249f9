"""Rotary position embeddings: tables computed once per step from the positions, applied in every layer.

The frequencies, their scaling and the float32-then-cast order follow the reference implementations, so the
rotated queries and keys match `transformers` to float rounding.
"""

from __future__ import annotations

import math

import torch

from swarm.models.spec import Rotary


def inverse_frequencies(rotary: Rotary, device: torch.device | None = None) -> torch.Tensor:
    exponents = torch.arange(0, rotary.dim, 2, dtype=torch.int64, device=device).float() / rotary.dim
    inv_freq = 1.0 / (rotary.base**exponents)
    scaling = rotary.scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slow down by `factor`, short ones stay, the band between is interpolated
    low_wavelen = scaling.original_max_positions / scaling.low_freq_factor
    high_wavelen = scaling.original_max_positions / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_positions / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(
    rotary: Rotary, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` [batch, tokens]: [batch, tokens, 1, dim], broadcast over heads."""
    freqs = positions.to(inv_freq.device, torch.float32)[..., None] * inv_freq
    table = torch.repeat_interleave(freqs, 2, dim=-1) if rotary.interleaved else torch.cat((freqs, freqs), dim=-1)
    return table.cos().to(dtype)[:, :, None], table.sin().to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate the first `rotary.dim` dimensions of every head of `x` [batch, tokens, heads, head_dim]."""
    if rotary.dim == x.shape[-1]:
        return x * cos + _rotated(x, rotary.interleaved) * sin
    turning, rest = x[..., : rotary.dim], x[..., rotary.dim :]
    return torch.cat((turning * cos + _rotated(turning, rotary.interleaved) * sin, rest), dim=-1)


def _rotated(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:  # (x0, x1, x2, x3) -> (-x1, x0, -x3, x2)
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
