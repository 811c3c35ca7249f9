"""Rotary position embeddings: a cos/sin table per node, looked up once per step, applied in every layer.

The frequencies, their scaling and the float32-then-cast order follow the reference implementations, so the
rotated queries and keys match `transformers` to the bit. The rotation itself is one matrix product with a
signed permutation (`x @ R` is exactly (-x2, x1), or (-x1, x0) per pair for GPT-J): three operations per step
and layer instead of slicing, negating and concatenating. Heads rotated only in part (GPT-NeoX, GPT-J) use
the same formula, with cos 1 and sin 0 over the dimensions that do not turn.
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


def rotation_matrix(rotary: Rotary, head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """R with `x @ R` = the rotated partner of each turning dimension (signed), 0 for the others."""
    matrix = torch.zeros(head_dim, head_dim, dtype=dtype, device=device)
    if rotary.interleaved:  # (x0, x1) -> (-x1, x0)
        for even in range(0, rotary.dim, 2):
            matrix[even + 1, even], matrix[even, even + 1] = -1, 1
    else:  # (x1, x2) -> (-x2, x1), halves of the turning part
        half = rotary.dim // 2
        for index in range(half):
            matrix[index + half, index], matrix[index, index + half] = -1, 1
    return matrix


class RotaryTable:
    """cos and sin of every position seen so far, [positions, head_dim] in the compute dtype, grown by doubling
    as longer sequences arrive; a step's tables are two lookups."""

    def __init__(self, rotary: Rotary, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rotary = rotary
        self.head_dim = head_dim
        self.dtype = dtype
        self.inv_freq = inverse_frequencies(rotary, device)
        self.rotation = rotation_matrix(rotary, head_dim, dtype, device)
        self.cos = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.sin = torch.empty(0, head_dim, dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions` [batch, tokens]: [batch, tokens, 1, head_dim], broadcast over heads."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0]:
            self._grow(max(needed, 2 * self.cos.shape[0], 64))
        return self.cos[positions][:, :, None], self.sin[positions][:, :, None]

    def _grow(self, length: int) -> None:
        positions = torch.arange(length, device=self.inv_freq.device)
        freqs = positions.float()[:, None] * self.inv_freq
        if self.rotary.interleaved:
            angles = torch.repeat_interleave(freqs, 2, dim=-1)
        else:
            angles = torch.cat((freqs, freqs), dim=-1)
        still = self.head_dim - self.rotary.dim  # dimensions that do not turn: cos 1, sin 0
        ones, zeros = torch.ones(length, still), torch.zeros(length, still)
        self.cos = torch.cat((angles.cos().to(self.dtype), ones.to(self.cos)), dim=-1)
        self.sin = torch.cat((angles.sin().to(self.dtype), zeros.to(self.sin)), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate every head of `x` [batch, tokens, heads, head_dim] (queries and keys together)."""
    return x * cos + (x @ rotation) * sin
