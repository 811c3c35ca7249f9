"""The `int8-block` tensor codec: 8-bit absmax quantization in blocks along the last dimension.

Hidden states are the bulk of every hop's bytes; at ~1.06 bytes a value instead of 2 or 4 they cost a
quarter (float32) or half (bfloat16) of the bandwidth, for an error of at most half a quantization
step, `scale / 254`, per value. The byte layout is part of the wire contract (see `WireTensor` in
`swarm/protocol.py` and docs/protocol.md); this module only does the arithmetic.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where values are computed: checking a frame's sizes needs none of it
    import torch

BLOCK_SIZE = 64
"""Consecutive values along the last dimension that share one scale; a row's last block may be shorter."""
SCALE_BYTES = 4
"""Scales are float32 so that any float32 hidden state (not only float16's range) has a finite scale."""
LEVELS = 127


def block_layout(shape: list[int]) -> tuple[int, int, int]:
    """`(rows, last_dim, blocks_per_row)` of a tensor of `shape` (at least one dimension)."""
    last = shape[-1]
    rows = math.prod(shape[:-1])
    return rows, last, -(-last // BLOCK_SIZE)


def encoded_sizes(shape: list[int]) -> tuple[int, int]:
    """Exact byte lengths of `(data, scales)` for `shape`: one int8 per value, one scale per block."""
    rows, last, blocks = block_layout(shape)
    return rows * last, rows * blocks * SCALE_BYTES


def quantize(tensor: torch.Tensor) -> tuple[bytes, bytes]:
    """`(data, scales)` of a floating tensor: `q = round(x / scale * 127)` with `scale` the block's absmax.

    An all-zero block gets scale 0 and zeros. A block holding NaN or infinity gets a NaN scale, so it
    decodes to NaN and fails the receiver's finiteness check exactly as the raw values would."""
    import torch

    rows, last, blocks = block_layout(list(tensor.shape))
    if rows * last == 0:
        return b"", b""
    padded = torch.nn.functional.pad(tensor.reshape(rows, last).float(), (0, blocks * BLOCK_SIZE - last))
    padded = padded.reshape(rows, blocks, BLOCK_SIZE)
    scales = padded.abs().amax(dim=-1)
    usable = torch.isfinite(scales) & (scales > 0)
    inverse = torch.where(usable, LEVELS / torch.where(usable, scales, 1.0), 0.0)
    finite = torch.nan_to_num(padded, nan=0.0, posinf=0.0, neginf=0.0)
    codes = torch.round(finite * inverse.unsqueeze(-1)).clamp_(-LEVELS, LEVELS)
    codes = codes.to(torch.int8).reshape(rows, blocks * BLOCK_SIZE)[:, :last]
    scales = torch.where(torch.isfinite(scales), scales, math.nan).to(torch.float32)
    return _bytes(codes.contiguous()), _bytes(scales)


def dequantize(data: bytes, scales: bytes, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The tensor `quantize` encoded, as `dtype`; lengths must already match `encoded_sizes(shape)`."""
    import torch

    rows, last, blocks = block_layout(shape)
    if rows * last == 0:
        return torch.empty(shape, dtype=dtype)
    codes = torch.frombuffer(bytearray(data), dtype=torch.int8).reshape(rows, last)
    steps = torch.frombuffer(bytearray(scales), dtype=torch.float32).reshape(rows, blocks) / LEVELS
    values = codes.float() * steps.repeat_interleave(BLOCK_SIZE, dim=1)[:, :last]
    return values.to(dtype).reshape(shape)


def _bytes(tensor: torch.Tensor) -> bytes:
    import torch

    return tensor.view(torch.uint8).numpy().tobytes()
