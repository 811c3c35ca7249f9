"""Reading Hugging Face checkpoints tensor by tensor, so a process loads only what it runs.

A node hosting 2 of 80 layers must not touch the other 78: the safetensors index
(`model.safetensors.index.json`) says which shard holds each tensor, and `safe_open` reads single
tensors from a shard without loading the rest of it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from swarm.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def model_name_from_path(model: str | Path, override: str | None = None) -> str:
    """The name a model is known by in the swarm: `override`, else the last path component."""
    if override:
        return override
    name = Path(str(model).rstrip("/\\")).name
    if not name:
        raise CheckpointError(f"cannot derive a model name from {str(model)!r}; pass --model-name")
    return name


def checkpoint_dir(model: str | Path) -> Path:
    """The local folder of a checkpoint, with an actionable error when it is not there."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(model)!r} not found. Pass a local Hugging Face folder "
            f"(download one with `huggingface-cli download NAME --local-dir ./models/NAME`)."
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    return path


@dataclass(frozen=True)
class CheckpointIndex:
    """Where each tensor of a checkpoint lives: tensor name -> shard file."""

    root: Path
    shard_of: dict[str, str]

    @classmethod
    def open(cls, model: str | Path) -> CheckpointIndex:
        root = checkpoint_dir(model)
        index_file = root / INDEX_FILE
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            return cls(root, dict(weight_map))
        single = root / SINGLE_FILE
        if single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                return cls(root, {name: SINGLE_FILE for name in handle.keys()})  # noqa: SIM118 - not a dict
        raise CheckpointError(f"{root} has neither {INDEX_FILE} nor {SINGLE_FILE}; only safetensors are supported")

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(name for name in self.shard_of if name.startswith(prefix))

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of


def read_tensors(
    index: CheckpointIndex,
    names: Iterable[str],
    *,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read exactly `names`, opening only the shards that hold them, one shard at a time."""
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if name not in index.shard_of:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {index.root}")
        by_shard[index.shard_of[name]].append(name)
    tensors: dict[str, torch.Tensor] = {}
    for shard, shard_names in sorted(by_shard.items()):
        with safe_open(str(index.root / shard), framework="pt") as handle:
            for name in shard_names:
                tensors[name] = handle.get_tensor(name)
                if on_tensor is not None:
                    on_tensor(name, tensors[name])
    return tensors


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def tensor_nbytes(index: CheckpointIndex, names: Iterable[str]) -> int:
    """Bytes the named tensors take on disk, from shard headers only (sizes a progress bar)."""
    return sum(numel * _SAFETENSORS_DTYPE_BYTES.get(dtype, 4) for numel, dtype in _tensor_sizes(index, names))


def tensor_numel(index: CheckpointIndex, names: Iterable[str]) -> int:
    """Elements (parameters) in the named tensors, from shard headers only."""
    return sum(numel for numel, _ in _tensor_sizes(index, names))


def _tensor_sizes(index: CheckpointIndex, names: Iterable[str]) -> list[tuple[int, str]]:
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if name in index.shard_of:
            by_shard[index.shard_of[name]].append(name)
    sizes = []
    for shard, shard_names in by_shard.items():
        with safe_open(str(index.root / shard), framework="pt") as handle:
            for name in shard_names:
                piece = handle.get_slice(name)
                sizes.append((math.prod(piece.get_shape()), piece.get_dtype()))
    return sizes
