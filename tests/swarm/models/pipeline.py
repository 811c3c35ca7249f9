"""The swarm's compute path in one process, without sockets: the client's local modules (loaded and applied as
`client/model.py` does) around two node spans, each with its own cache as a node session keeps one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from client.model import load_local_modules, position_ids_from_mask
from node.span import LoadedSpan
from swarm.checkpoint import load_config
from swarm.models import ModelAdapter, adapter_for


@dataclass
class Generation:
    tokens: torch.Tensor
    logits: list[torch.Tensor]


@dataclass
class Pipeline:
    adapter: ModelAdapter
    local: nn.ModuleDict
    spans: list[LoadedSpan]

    @classmethod
    def load(cls, model: Path, split: int, dtype: torch.dtype = torch.float32) -> Pipeline:
        """Layers [0, split) on one span and [split, N) on another."""
        adapter = adapter_for(load_config(model))
        bounds = [(0, split), (split, adapter.num_layers)]
        cpu = torch.device("cpu")
        spans = [LoadedSpan.load(model, a, b, cpu, dtype, show_progress=False) for a, b in bounds]
        return cls(adapter, load_local_modules(model, adapter, dtype), spans)

    @torch.inference_mode()
    def step(self, new_ids: torch.Tensor, mask: torch.Tensor, caches: list[object]) -> torch.Tensor:
        """Logits of the new tokens; `mask` covers everything the caches hold plus the new tokens."""
        positions = position_ids_from_mask(mask)[:, -new_ids.shape[1] :]
        hidden = self.adapter.embed(self.local, self.local["embed"](new_ids), positions)
        for span, cache in zip(self.spans, caches, strict=True):
            hidden = span.forward(hidden, positions, mask, cache, span.start, span.end)
        return self.adapter.logits(self.local, hidden).float()

    def greedy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> Generation:
        """Prefill, then one token per step: each decode step sends only the new token through the spans."""
        caches = [span.new_cache() for span in self.spans]
        tokens, mask, new_ids = input_ids, attention_mask, input_ids
        logits = []
        for _ in range(new_tokens):
            last = self.step(new_ids, mask, caches)[:, -1]
            new_ids = last.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, new_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(new_ids)], dim=1)
            logits.append(last)
        return Generation(tokens, logits)
