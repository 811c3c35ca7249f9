"""Our parameters from a checkpoint's tensors: a name map per family, read tensor by tensor.

Each of our parameters has a `Source`: the checkpoint tensors it is made of (each with alternative names, for
layouts published checkpoints differ in) and how to combine them (concatenate q, k and v; reorder a fused
per-head projection; transpose GPT-2's Conv1D; stack experts). Only the named tensors are read, so a node's
memory and start time follow its span.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from swarm.checkpoint import CheckpointIndex, read_tensors
from swarm.errors import CheckpointError


def _only(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


@dataclass(frozen=True)
class Source:
    inputs: tuple[tuple[str, ...], ...]
    """Checkpoint tensors, each as its alternative names (the first one present is read)."""
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = _only


def tensor(*names: str) -> Source:
    """One checkpoint tensor, under the first of `names` the checkpoint has."""
    return Source((names,))


def concat(*names: str | tuple[str, ...], dim: int = 0) -> Source:
    """Several tensors side by side (q, k and v into one projection)."""
    inputs = tuple((name,) if isinstance(name, str) else name for name in names)
    return Source(inputs, lambda tensors: torch.cat(tensors, dim=dim))


def transformed(name: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> Source:
    return Source(((name,),), lambda tensors: transform(tensors[0]))


def stacked(names: Sequence[tuple[str, ...]], per_item: int) -> Source:
    """Experts' matrices stacked into one tensor: `names` lists, expert by expert, `per_item` tensors each that are
    concatenated first (gate then up)."""
    inputs = tuple((name,) for group in names for name in group)

    def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
        groups = [tensors[i : i + per_item] for i in range(0, len(tensors), per_item)]
        return torch.stack([torch.cat(group, dim=0) if per_item > 1 else group[0] for group in groups])

    return Source(inputs, combine)


def heads_interleaved(groups: int, per_group: Sequence[int], head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fused projection stored group by group ([q heads, k heads, v heads] per group, as GPT-NeoX, BLOOM and
    Falcon store it) reordered to all queries, then all keys, then all values. Works on weights and biases."""

    def reorder(fused: torch.Tensor) -> torch.Tensor:
        parts = fused.reshape(groups, sum(per_group), head_dim, *fused.shape[1:])
        pieces, first = [], 0
        for count in per_group:
            pieces.append(parts[:, first : first + count].reshape(groups * count * head_dim, *fused.shape[1:]))
            first += count
        return torch.cat(pieces, dim=0)

    return reorder


def resolve(index: CheckpointIndex, names: tuple[str, ...]) -> str:
    """The first of `names` the checkpoint stores, also without its leading module prefix (GPT-2 and BLOOM files
    published without `transformer.`)."""
    for name in names:
        if name in index:
            return name
    for name in names:
        _, _, bare = name.partition(".")
        if bare in index:
            return bare
    raise CheckpointError(f"checkpoint at {index.root} lacks tensor {names[0]!r}")


def stored_names(index: CheckpointIndex, sources: dict[str, Source]) -> list[str]:
    """Every checkpoint tensor `sources` read, as the checkpoint names them."""
    return sorted({resolve(index, names) for source in sources.values() for names in source.inputs})


def load_weights(
    index: CheckpointIndex,
    sources: dict[str, Source],
    device: torch.device,
    dtype: torch.dtype,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Our parameters by name, built from exactly the checkpoint tensors `sources` name, in `dtype` on `device`.

    Every parameter owns its memory: a tensor read from a shard is a view of the memory-mapped file, and one
    kept alive would keep the file's mapping, with every page of it the loading touched, in the process."""
    resolved = {key: [resolve(index, names) for names in source.inputs] for key, source in sources.items()}
    stored = read_tensors(index, sorted({name for names in resolved.values() for name in names}), on_tensor=on_tensor)
    mapped = {tensor.untyped_storage().data_ptr() for tensor in stored.values()}
    weights = {}
    for key, source in sources.items():
        value = source.combine([stored[name] for name in resolved[key]])
        value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype).contiguous()
        if value.untyped_storage().data_ptr() in mapped:
            value = value.clone()
        weights[key] = value
    return weights
