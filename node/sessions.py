"""Open sessions and the node's cache budget, as plain bookkeeping with no I/O.

A session reserves its rows of the KV cache when it opens (`batch_size` rows of the capacity that fits its
`max_length`), so a node never promises more memory than `--cache-tokens` allows; the rows return to the cache
and the budget when the session closes or expires.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from swarm.errors import ErrorCode, ProtocolError


class SessionCache(Protocol):
    """A session's slice of the node's KV cache (`swarm.node.kv_cache.CacheRows`)."""

    def release(self) -> None: ...


@dataclass
class Session:
    session_id: str
    owner: int
    start: int
    end: int
    max_length: int
    batch_size: int
    cache: SessionCache
    reserved_tokens: int
    """Cache tokens its rows take (`batch_size` x the rows' capacity, at least `max_length`)."""
    last_used: float
    opened_at: float = 0.0
    length: int = 0
    """Tokens its cache holds, padding included."""
    last_positions: torch.Tensor | None = None
    closed: bool = False
    """Set when the session ends: a step of it still waiting must not run (its cache rows are given away)."""


class SessionTable:
    """Open sessions of one node, keyed by id, each visible only to the connection that opened it."""

    def __init__(self, cache_tokens: int, max_sessions: int) -> None:
        self.cache_tokens = cache_tokens
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def tokens_reserved(self) -> int:
        return sum(session.reserved_tokens for session in self._sessions.values())

    @property
    def tokens_free(self) -> int:
        return max(self.cache_tokens - self.tokens_reserved, 0)

    def open(
        self,
        session_id: str,
        owner: int,
        span: tuple[int, int],
        max_length: int,
        batch_size: int,
        now: float,
        row_capacity: Callable[[int], int],
        allocate: Callable[[int, int], SessionCache],
    ) -> Session:
        """`row_capacity(max_length)`: tokens a cache row for it holds; `allocate(batch, max_length)`: its rows."""
        if session_id in self._sessions:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"session {session_id!r} is already open")
        if len(self._sessions) >= self.max_sessions:
            raise ProtocolError(ErrorCode.BUSY, f"node is at its limit of {self.max_sessions} sessions")
        needed = batch_size * row_capacity(max_length)
        if needed > self.tokens_free:
            raise ProtocolError(
                ErrorCode.BUSY,
                f"session needs {needed} cache tokens (batch {batch_size} x {row_capacity(max_length)}), "
                f"{self.tokens_free} free",
            )
        cache = allocate(batch_size, max_length)
        session = Session(session_id, owner, span[0], span[1], max_length, batch_size, cache, needed, now, now)
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str, owner: int) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no open session {session_id!r} on this connection")
        return session

    def close(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        session.closed = True
        session.cache.release()
        return True

    def close_owned_by(self, owner: int) -> list[str]:
        """Free every session of a connection that went away."""
        gone = [sid for sid, session in self._sessions.items() if session.owner == owner]
        for session_id in gone:
            self.close(session_id)
        return gone

    def expire(self, now: float, idle_timeout: float, max_age: float = float("inf")) -> list[str]:
        """Free sessions idle for longer than `idle_timeout` or open for longer than `max_age`."""
        gone = [
            sid
            for sid, session in self._sessions.items()
            if now - session.last_used > idle_timeout or now - session.opened_at > max_age
        ]
        for session_id in gone:
            self.close(session_id)
        return gone
