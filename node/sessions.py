"""Open sessions and the node's cache budget, as plain bookkeeping with no I/O.

A session reserves its rows of the KV cache when it opens (`batch_size` rows of the capacity that fits its
`max_length`), so a node never promises more memory than `--cache-tokens` allows; the rows return to the cache
and the budget when the session closes or expires.

Opening is cheap and holding is free, so one client could otherwise take the whole node: each client holds at most
its `ClientShare` (sessions and cache tokens), where a client is a connection and, apart, all the connections from
one remote address together. Sessions that never step expire early, and a client within its share may reclaim
them from others when the node is full.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from swarm.errors import ErrorCode, ProtocolError
from swarm.models.adapters import LayerAdapters

RECLAIM_AFTER = 5.0
"""Seconds a session may wait for its first step before a client short of room may reclaim it: an honest client
steps within this (a chain's later links wait for the earlier links' prefill)."""


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
    address: str | None = None
    """The client address its connection counts under (`swarm.node.admission.client_address`); None: its own."""
    stepped: bool = False
    """A step of it was accepted; until then it expires after `--first-step-timeout` and may be reclaimed."""
    adapter: LayerAdapters | None = None
    """The low-rank adapter every step of it runs with (`OpenSession.adapter`), or None."""
    relay_key: str | None = None
    """With it, the previous peer of the client's chain may send the session's steps (`Step.relay_key`)."""

    def of_client(self, owner: int, address: str | None) -> bool:
        """Whether the session counts against the client that is connection `owner` from `address`."""
        return self.owner == owner or (address is not None and self.address == address)


@dataclass(frozen=True)
class ClientShare:
    """What one client may hold of a node: its connection, and all connections from its address together."""

    sessions: int
    cache_tokens: int


class SessionTable:
    """Open sessions of one node, keyed by id, each visible only to the connection that opened it."""

    def __init__(self, cache_tokens: int, max_sessions: int, share: ClientShare | None = None) -> None:
        self.cache_tokens = cache_tokens
        self.max_sessions = max_sessions
        self.share = share
        """None: no limits per client (the node's own apply)."""
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
        address: str | None = None,
        adapter: LayerAdapters | None = None,
        relay_key: str | None = None,
    ) -> Session:
        """`row_capacity(max_length)`: tokens a cache row for it holds; `allocate(batch, max_length)`: its rows.
        `owner` is the connection, `address` the client address it counts under (None: the connection alone)."""
        if session_id in self._sessions:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"session {session_id!r} is already open")
        needed = batch_size * row_capacity(max_length)
        self.check_share(needed, owner, address)
        if len(self._sessions) >= self.max_sessions:
            raise ProtocolError(ErrorCode.BUSY, f"node is at its limit of {self.max_sessions} sessions")
        if needed > self.tokens_free:
            raise ProtocolError(
                ErrorCode.BUSY,
                f"session needs {needed} cache tokens (batch {batch_size} x {row_capacity(max_length)}), "
                f"{self.tokens_free} free",
            )
        cache = allocate(batch_size, max_length)
        session = Session(session_id, owner, span[0], span[1], max_length, batch_size, cache, needed, now, now)
        session.address = address
        session.adapter = adapter
        session.relay_key = relay_key
        self._sessions[session_id] = session
        return session

    def check_share(self, needed: int, owner: int, address: str | None) -> None:
        """Refuse (`busy`) a session of `needed` cache tokens that would take the client past its share. A client's
        first session may exceed the cache share, or a node whose cache fits one long session would refuse it."""
        if self.share is None:
            return
        clients = [("this connection", lambda s: s.owner == owner)]
        if address is not None:
            clients.append((f"address {address}", lambda s: s.address == address))
        for who, belongs in clients:
            held = [session for session in self._sessions.values() if belongs(session)]
            if len(held) >= self.share.sessions:
                raise ProtocolError(
                    ErrorCode.BUSY,
                    f"{who} holds {len(held)} sessions, the most one client may hold on this node; "
                    "close one or try another peer",
                )
            tokens = sum(session.reserved_tokens for session in held)
            if held and tokens + needed > self.share.cache_tokens:
                raise ProtocolError(
                    ErrorCode.BUSY,
                    f"{who} holds {tokens} cache tokens; {needed} more would pass one client's share of "
                    f"{self.share.cache_tokens} on this node; try another peer",
                )

    def reclaim(self, needed: int, owner: int, address: str | None, now: float) -> list[str]:
        """Make room for a session of `needed` tokens on a full node by closing other clients' sessions that have
        waited `RECLAIM_AFTER` seconds or more for their first step, oldest first; returns their ids. Closes none
        when there is room already or when closing all of them would not make enough; a client past its share
        is refused (`busy`) as `open` would refuse it."""
        self.check_share(needed, owner, address)
        sessions_short = len(self._sessions) + 1 - self.max_sessions
        tokens_short = needed - self.tokens_free
        if sessions_short <= 0 and tokens_short <= 0:
            return []
        chosen: list[Session] = []
        freed = 0
        for session in self._reclaimable(owner, address, now):
            if len(chosen) >= sessions_short and freed >= tokens_short:
                break
            chosen.append(session)
            freed += session.reserved_tokens
        if len(chosen) < sessions_short or freed < tokens_short:
            return []
        for session in chosen:
            self.close(session.session_id)
        return [session.session_id for session in chosen]

    def _reclaimable(self, owner: int, address: str | None, now: float) -> list[Session]:
        """Other clients' sessions still waiting for their first step after `RECLAIM_AFTER`, oldest first."""
        waiting = [
            session
            for session in self._sessions.values()
            if not session.stepped
            and now - session.opened_at >= RECLAIM_AFTER
            and not session.of_client(owner, address)
        ]
        return sorted(waiting, key=lambda session: session.opened_at)

    def get(self, session_id: str, owner: int) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no open session {session_id!r} on this connection")
        return session

    def get_relayed(self, session_id: str, relay_key: str) -> Session:
        """A session stepped by another peer on its owner's behalf: it must have been opened with `relay_key`."""
        session = self._sessions.get(session_id)
        if session is None or session.relay_key is None or not hmac.compare_digest(session.relay_key, relay_key):
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no session {session_id!r} open for relayed steps here")
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

    def expire(
        self, now: float, idle_timeout: float, max_age: float = float("inf"), first_step_timeout: float = float("inf")
    ) -> list[str]:
        """Free sessions idle for longer than `idle_timeout`, open for longer than `max_age`, or still waiting for
        their first step after `first_step_timeout`."""
        gone = [
            sid
            for sid, session in self._sessions.items()
            if now - session.last_used > idle_timeout
            or now - session.opened_at > max_age
            or (not session.stepped and now - session.opened_at > first_step_timeout)
        ]
        for session_id in gone:
            self.close(session_id)
        return gone
