"""A contiguous run of decoder layers and what one step shares across them (rotary tables, the attention)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from swarm.checkpoint import CheckpointIndex
from swarm.identity import LayerDigest
from swarm.models import ModelArchitecture
from swarm.models.adapters import RowAdapter
from swarm.models.block import Attention, DecoderLayer, StepContext
from swarm.models.rotary import RotaryTable
from swarm.models.weights import Source, load_weights, stored_names


class LayerStack(nn.Module):
    """Layers [start, end) of one model on one device."""

    def __init__(self, architecture: ModelArchitecture, start: int, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.spec = architecture.spec
        self.start = start
        self.end = start + len(layers)
        self.layers = nn.ModuleList(layers)
        self.layer_digests: list[bytes] = []
        """Each layer's tensors as read from the checkpoint (`swarm.identity`), when loaded from one."""
        self._layer_list = layers  # slicing a ModuleList builds a module on every step; a list slice does not
        rotary = self.spec.rotary
        weight = next(self.parameters())
        dtype = compute_dtype(weight)
        self.rotary = RotaryTable(rotary, self.spec.head_dim, dtype, weight.device) if rotary is not None else None

    @classmethod
    def load(
        cls,
        index: CheckpointIndex,
        architecture: ModelArchitecture,
        start: int,
        end: int,
        device: torch.device,
        dtype: torch.dtype,
        on_tensor: Callable[[str, torch.Tensor], None] | None = None,
    ) -> LayerStack:
        """Read exactly the tensors of layers [start, end), one layer at a time, hashing them as they are read."""
        layers, digests = [], []
        for i in range(start, end):
            digest = LayerDigest()

            def seen(name: str, tensor: torch.Tensor, digest: LayerDigest = digest) -> None:
                digest.add(name, tensor)
                if on_tensor is not None:
                    on_tensor(name, tensor)

            weights = load_weights(index, layer_sources(architecture, i), device, dtype, seen)
            layers.append(DecoderLayer(architecture.spec, i, weights).eval())
            digests.append(digest.digest())
        stack = cls(architecture, start, layers)
        stack.layer_digests = digests
        return stack

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention: Attention,
        start: int,
        end: int,
        adapters: list[RowAdapter] | None = None,
        recompute: bool = False,
    ) -> torch.Tensor:
        """Layers [start, end) (inside this stack) over new tokens at `positions` [batch, tokens], with the
        adapters of the rows that have one. `recompute` (for a backward pass) keeps only each layer's input and
        computes the layer again when its gradient is needed, so memory holds one layer's activations at a time."""
        context = StepContext(attention, adapters=adapters or [])
        if self.rotary is not None:
            context.cos, context.sin = self.rotary.lookup(positions)
            context.rotation = self.rotary.rotation
        for layer in self._layer_list[start - self.start : end - self.start]:
            if recompute:
                hidden = checkpoint(layer.forward, hidden, context, use_reentrant=False)
            else:
                hidden = layer.forward(hidden, context)  # not __call__: see DecoderLayer.forward
        return hidden

    def compile(self) -> None:
        """Compile each layer with `torch.compile` (on first use; dynamic shapes, since a round's batch and
        cached length change from step to step): on a GPU it fuses a decode step's many small operations."""
        for layer in self._layer_list:
            layer.forward = torch.compile(layer.forward, dynamic=True)  # type: ignore[method-assign]


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype activations run in: the weights' own, float32 under int8 weights (which are quantized after
    loading, so this is read while they are still floating)."""
    return weight.dtype if weight.is_floating_point() else torch.float32


def layer_sources(architecture: ModelArchitecture, index: int) -> dict[str, Source]:
    return architecture.family.sources_of_layer(architecture.spec, index)


def layer_tensor_names(index: CheckpointIndex, architecture: ModelArchitecture, start: int, end: int) -> list[str]:
    """The checkpoint tensors layers [start, end) are made of (for sizes and progress before loading)."""
    return sorted({name for i in range(start, end) for name in stored_names(index, layer_sources(architecture, i))})
