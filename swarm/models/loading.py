"""Turning meta-device modules into real ones from checkpoint tensors, reading nothing else."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from swarm.checkpoint import CheckpointIndex, read_tensors
from swarm.errors import CheckpointError
from swarm.transformers_compat import checkpoint_renamer


def module_tensor_names(module: nn.Module, prefix: str) -> list[str]:
    """Checkpoint names of a module's parameters and persistent buffers."""
    return [prefix + name for name in module.state_dict()]


def checkpoint_aliases(skeleton: PreTrainedModel, index: CheckpointIndex) -> dict[str, str]:
    """Model tensor name -> the name the checkpoint stores it under, where the two differ.

    Published checkpoints keep layouts that `from_pretrained` renames on load: GPT-NeoX's `embed_out` (which
    `save_pretrained` still writes), GPT-2 or BLOOM files without the `transformer.` prefix. This applies
    `transformers`' own renaming rules to the index's names, so no tensor is read to find out."""
    rename = checkpoint_renamer(skeleton)
    aliases: dict[str, str] = {}
    for stored in index.shard_of:
        name = rename(stored)
        if name != stored:
            aliases.setdefault(name, stored)
    return aliases


def materialize(
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """Allocate `module` on `device` and fill it from `tensors` (names carry `prefix`)."""
    expected = module.state_dict().keys()
    state = {}
    for name in expected:
        tensor = tensors.get(prefix + name)
        if tensor is None:
            raise CheckpointError(f"checkpoint lacks tensor {prefix + name!r}")
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_modules(
    index: CheckpointIndex,
    modules: dict[str, tuple[nn.Module, str]],
    device: torch.device,
    dtype: torch.dtype,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
    aliases: dict[str, str] | None = None,
) -> dict[str, nn.Module]:
    """Materialize several modules at once, each `(meta module, checkpoint prefix)`.

    `aliases` maps a wanted tensor name to the one stored instead (tied embeddings).
    """
    aliases = aliases or {}
    wanted = [name for module, prefix in modules.values() for name in module_tensor_names(module, prefix)]
    stored = read_tensors(index, sorted({aliases.get(name, name) for name in wanted}), on_tensor=on_tensor)
    tensors = {name: stored[aliases.get(name, name)] for name in wanted}
    return {key: materialize(module, tensors, prefix, device, dtype) for key, (module, prefix) in modules.items()}
