"""How much memory a model's pieces take, from checkpoint headers and config alone (nothing loaded).

Feeds `swarm-node --max-memory/--layers auto` (how many layers fit) and `swarm-client estimate`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from swarm.checkpoint import CheckpointIndex, tensor_numel
from swarm.models import ModelArchitecture

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """`6GiB`, `512MB`, `1.5g` or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r} must look like 6GiB, 512MB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


@dataclass(frozen=True)
class ModelFootprint:
    """Parameter counts by piece, and the KV cache per token; bytes follow for any dtype."""

    num_layers: int
    layer_params: list[int]
    local_params: int
    kv_values_per_token_per_layer: int

    @classmethod
    def of(cls, index: CheckpointIndex, architecture: ModelArchitecture) -> ModelFootprint:
        spec = architecture.spec
        layers = spec.num_layers
        per_layer = [tensor_numel(index, index.names_with_prefix(architecture.layer_prefix(i))) for i in range(layers)]
        local = tensor_numel(index, list(index.shard_of)) - sum(per_layer)
        return cls(layers, per_layer, local, 2 * spec.num_kv_heads * spec.head_dim)

    @property
    def total_params(self) -> int:
        return sum(self.layer_params) + self.local_params

    def layer_bytes(self, dtype: str) -> int:
        """The largest layer, so a plan never under-counts."""
        return max(self.layer_params) * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Per layer; KV caches stay in the compute dtype (float32 when weights are int8)."""
        return self.kv_values_per_token_per_layer * DTYPE_BYTES["float32" if dtype == "int8" else dtype]

    def layers_that_fit(self, budget: int, dtype: str, cache_tokens: int) -> int:
        """How many layers' weights plus a `cache_tokens` KV cache fit in `budget` bytes."""
        per_layer = self.layer_bytes(dtype) + cache_tokens * self.kv_bytes_per_token(dtype)
        return max(0, min(self.num_layers, budget // per_layer))

    def nodes_to_cover(self, budget: int, dtype: str, cache_tokens: int) -> int | None:
        fit = self.layers_that_fit(budget, dtype, cache_tokens)
        return math.ceil(self.num_layers / fit) if fit else None


def default_memory_budget(device: str) -> int:
    """Half the machine's RAM on CPU, 90% of the free GPU memory: a budget that works on a laptop."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
