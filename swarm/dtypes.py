"""The floating dtypes swarm computes and sends hidden states in, by name.

Free of torch, so that settings and `--help` can offer them; `swarm.tensors.WIRE_DTYPES` maps names to torch.
"""

from __future__ import annotations

from typing import Literal, get_args

FloatDType = Literal["float32", "float16", "bfloat16"]
FLOAT_DTYPE_NAMES: tuple[FloatDType, ...] = get_args(FloatDType)
