"""The swarm's compute path in one process, without sockets: the client's local modules (as `client/model.py`
applies them) around two node spans, each stepping a node session through the node's own step code."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.client.core.model import position_ids_from_mask
from swarm.models import ModelArchitecture
from swarm.models.local import LocalModules
from swarm.node.kv_cache import capacity_for
from swarm.node.sessions import Session, SessionTable
from swarm.node.span import LoadedSpan
from swarm.node.steps import run_alone
from swarm.node.validation import StepInputs

_ids = itertools.count()


@dataclass
class Generation:
    tokens: torch.Tensor
    logits: list[torch.Tensor]


def open_session(span: LoadedSpan, table: SessionTable, batch: int, max_length: int = 64) -> Session:
    return table.open(
        f"s{next(_ids)}", 1, (span.start, span.end), max_length, batch, 0.0, capacity_for, span.cache.allocate
    )


@dataclass
class Pipeline:
    architecture: ModelArchitecture
    local: LocalModules
    spans: list[LoadedSpan]
    table: SessionTable

    @classmethod
    def load(cls, model: Path, split: int, dtype: torch.dtype = torch.float32) -> Pipeline:
        """Layers [0, split) on one span and [split, N) on another."""
        architecture = ModelArchitecture.of(model)
        bounds = [(0, split), (split, architecture.num_layers)]
        cpu = torch.device("cpu")
        spans = [LoadedSpan.load(model, a, b, cpu, dtype, show_progress=False) for a, b in bounds]
        table = SessionTable(cache_tokens=1_000_000, max_sessions=1000)
        return cls(architecture, LocalModules.load(model, architecture, dtype), spans, table)

    def open(self, batch: int, max_length: int = 64) -> list[Session]:
        return [open_session(span, self.table, batch, max_length) for span in self.spans]

    @torch.inference_mode()
    def step(self, new_ids: torch.Tensor, mask: torch.Tensor, sessions: list[Session]) -> torch.Tensor:
        """Logits of the new tokens; `mask` covers everything the sessions hold plus the new tokens."""
        new = new_ids.shape[1]
        positions = position_ids_from_mask(mask)[:, -new:]
        hidden = self.local.first_hidden(self.local.embed(new_ids), positions)
        for span, session in zip(self.spans, sessions, strict=True):
            inputs = StepInputs(hidden, positions, mask[:, -new:].bool(), None)
            hidden = run_alone(span, session, inputs)
        return self.local.logits(hidden).float()

    def greedy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> Generation:
        """Prefill, then one token per step: each decode step sends only the new token through the spans."""
        sessions = self.open(input_ids.shape[0], input_ids.shape[1] + new_tokens)
        tokens, mask, new_ids = input_ids, attention_mask, input_ids
        logits = []
        try:
            for _ in range(new_tokens):
                last = self.step(new_ids, mask, sessions)[:, -1]
                new_ids = last.argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, new_ids], dim=1)
                mask = torch.cat([mask, torch.ones_like(new_ids)], dim=1)
                logits.append(last)
        finally:
            for session in sessions:
                self.table.close(session.session_id)
        return Generation(tokens, logits)
