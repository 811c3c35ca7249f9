"""Session bookkeeping: the cache budget, ownership and expiry."""

from __future__ import annotations

import pytest

from swarm.errors import ProtocolError
from swarm.node.sessions import SessionTable

released: list[str] = []


class Rows:
    """Stands for a session's rows of the KV cache; records when they are given back."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def release(self) -> None:
        released.append(self.session_id)


def open_session(
    table: SessionTable, session_id: str, owner: int = 1, max_length: int = 10, batch: int = 1, now: float = 0.0
):
    """Rows hold their `max_length` rounded up to a multiple of 10 tokens."""
    return table.open(
        session_id, owner, (0, 4), max_length, batch, now, lambda n: -(-n // 10) * 10, lambda b, n: Rows(session_id)
    )


def test_sessions_reserve_their_cache_up_front_and_give_it_back() -> None:
    table = SessionTable(cache_tokens=100, max_sessions=10)
    open_session(table, "a", max_length=27, batch=2)  # rows of 30 tokens
    assert table.tokens_free == 40
    with pytest.raises(ProtocolError) as info:
        open_session(table, "b", max_length=45)
    assert info.value.code == "busy" and "40 free" in info.value.message
    released.clear()
    table.close("a")
    assert table.tokens_free == 100 and released == ["a"]
    open_session(table, "b", max_length=50)


def test_session_count_is_bounded() -> None:
    table = SessionTable(cache_tokens=1000, max_sessions=1)
    open_session(table, "a")
    with pytest.raises(ProtocolError, match="limit of 1 sessions"):
        open_session(table, "b")


def test_a_session_is_visible_only_to_its_connection() -> None:
    table = SessionTable(cache_tokens=1000, max_sessions=4)
    open_session(table, "a", owner=1)
    assert table.get("a", 1).session_id == "a"
    with pytest.raises(ProtocolError) as info:
        table.get("a", 2)
    assert info.value.code == "unknown_session"
    with pytest.raises(ProtocolError):
        open_session(table, "a", owner=2)


def test_closed_connections_and_idle_sessions_free_their_caches() -> None:
    table = SessionTable(cache_tokens=1000, max_sessions=8)
    open_session(table, "a", owner=1, now=0.0)
    open_session(table, "b", owner=2, now=0.0)
    open_session(table, "c", owner=2, now=50.0)
    released.clear()
    assert sorted(table.close_owned_by(2)) == ["b", "c"]
    assert table.expire(now=100.0, idle_timeout=60.0) == ["a"]
    assert len(table) == 0 and sorted(released) == ["a", "b", "c"]


def test_sessions_have_a_maximum_age_even_when_busy() -> None:
    table = SessionTable(cache_tokens=1000, max_sessions=8)
    open_session(table, "old", now=0.0)
    open_session(table, "young", now=90.0)
    table.get("old", 1).last_used = 99.0
    assert table.expire(now=100.0, idle_timeout=60.0, max_age=95.0) == ["old"]
