"""Opening node sessions and reading what their caches hold, for tests that step spans in-process."""

from __future__ import annotations

import torch

from swarm.node.kv_cache import CacheRows, capacity_for
from swarm.node.sessions import Session, SessionTable
from swarm.node.span import LoadedSpan


def open_session(
    span: LoadedSpan, table: SessionTable, session_id: str, batch_size: int, max_length: int = 64
) -> Session:
    return table.open(
        session_id, 1, (span.start, span.end), max_length, batch_size, 0.0, capacity_for, span.cache.allocate
    )


def rows_of(session: Session) -> CacheRows:
    assert isinstance(session.cache, CacheRows)
    return session.cache


def stored(session: Session) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values a session's cache holds: [layers, batch, kv_heads, length, head_dim] each."""
    rows = rows_of(session)
    return (
        rows.slab.keys[:, rows.rows, :, : session.length],
        rows.slab.values[:, rows.rows, :, : session.length],
    )


def real_tokens(session: Session) -> torch.Tensor:
    """[batch, length]: which of a session's cached tokens are real (not left padding)."""
    rows = rows_of(session)
    return rows.slab.bias[rows.rows, : session.length] == 0
