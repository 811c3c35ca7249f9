"""Tensors on the wire, torch side: the torch dtype of each wire dtype name, and `WireTensor` <-> torch.

Kept apart from `swarm.protocol` so that a process that never touches a tensor (the registry, `--help`) never
imports torch; `WireTensor.from_torch` and `to_torch` come here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from swarm import compression
from swarm.dtypes import FLOAT_DTYPE_NAMES

if TYPE_CHECKING:
    from swarm.protocol import Codec, WireTensor

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}


def encode(tensor: torch.Tensor, codec: Codec = "raw") -> dict[str, object]:
    """`WireTensor`'s fields for `tensor`: bit-exact (`raw`), or 8-bit blocks that decode to its dtype."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype not in DTYPE_NAMES:
        raise TypeError(f"dtype {tensor.dtype} cannot travel on the wire")
    name = DTYPE_NAMES[tensor.dtype]
    if codec == "int8-block":
        if name not in FLOAT_DTYPE_NAMES or tensor.dim() == 0:
            raise TypeError(f"int8-block encodes floating tensors of at least one dimension, not {tensor.dtype}")
        data, scales = compression.quantize(tensor)
        return {"dtype": name, "shape": list(tensor.shape), "data": data, "codec": codec, "scales": scales}
    raw = tensor.view(torch.uint8) if tensor.dtype != torch.bool and tensor.numel() else tensor
    data = raw.numpy().tobytes() if tensor.numel() else b""
    return {"dtype": name, "shape": list(tensor.shape), "data": data}


def decode(wire: WireTensor) -> torch.Tensor:
    dtype = WIRE_DTYPES[wire.dtype]
    if wire.codec == "int8-block":
        return compression.dequantize(wire.data, wire.scales or b"", wire.shape, dtype)
    if not wire.data:
        return torch.empty(wire.shape, dtype=dtype)
    return torch.frombuffer(bytearray(wire.data), dtype=dtype).reshape(wire.shape)
