"""The client's part of a model: token embeddings (plus learned positions, an embedding norm, a projection, as
the family has them) before the first layer, and the final norm and LM head after the last."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from swarm.checkpoint import CheckpointIndex
from swarm.models import ModelArchitecture
from swarm.models.block import make_norm
from swarm.models.linear import make_linear
from swarm.models.packed import pack_linears
from swarm.models.weights import load_weights


class LocalModules(nn.Module):
    def __init__(self, architecture: ModelArchitecture, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        spec = architecture.spec
        self.local = spec.local
        self.embed = nn.Embedding.from_pretrained(weights["embed.weight"], freeze=True)
        self.positions = (
            nn.Embedding.from_pretrained(weights["positions.weight"], freeze=True)
            if spec.local.learned_positions
            else None
        )
        self.embed_norm = make_norm(spec, weights, "embed_norm") if spec.local.embed_norm else None
        self.project_in = make_linear(weights, "project_in") if spec.local.projection else None
        self.project_out = make_linear(weights, "project_out") if spec.local.projection else None
        self.final_norm = make_norm(spec, weights, "final_norm") if spec.local.final_norm else None
        self.head = make_linear(weights, "head")

    @classmethod
    def load(cls, model: str | Path, architecture: ModelArchitecture, dtype: torch.dtype) -> LocalModules:
        """Read only the local modules' tensors (a tied head reuses the embedding tensor). On a CPU the large
        linear layers are then packed (`swarm.models.packed`), once the loaded tensors' map is gone, so that each
        plain weight goes as its packed copy arrives; a tied head stays plain: it is the embedding's tensor."""
        sources = architecture.family.local_sources(architecture.spec)
        local = cls(architecture, load_weights(CheckpointIndex.open(model), sources, torch.device("cpu"), dtype))
        if not architecture.spec.local.tied_head:
            pack_linears(local)
        return local.eval()

    def first_hidden(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What enters the first layer, from token embeddings and their positions."""
        if self.project_in is not None:
            embeddings = self.project_in(embeddings)
        if self.positions is not None:
            embeddings = embeddings + self.positions(positions + self.local.position_offset)
        if self.embed_norm is not None:
            embeddings = self.embed_norm(embeddings)
        return embeddings

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return self.head(hidden)
