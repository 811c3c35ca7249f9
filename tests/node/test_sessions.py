"""Session bookkeeping: the cache budget, ownership and expiry."""

from __future__ import annotations

import pytest

from swarm.errors import ProtocolError
from swarm.node.sessions import RECLAIM_AFTER, ClientShare, SessionTable

released: list[str] = []


class Rows:
    """Stands for a session's rows of the KV cache; records when they are given back."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def release(self) -> None:
        released.append(self.session_id)


def open_session(
    table: SessionTable,
    session_id: str,
    owner: int = 1,
    max_length: int = 10,
    batch: int = 1,
    now: float = 0.0,
    address: str | None = None,
):
    """Rows hold their `max_length` rounded up to a multiple of 10 tokens."""
    return table.open(
        session_id,
        owner,
        (0, 4),
        max_length,
        batch,
        now,
        lambda n: -(-n // 10) * 10,
        lambda b, n: Rows(session_id),
        address,
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


def shared(sessions: int = 3, cache_tokens: int = 50) -> SessionTable:
    """A node of 100 cache tokens and 10 sessions, of which one client may hold `sessions` and `cache_tokens`."""
    return SessionTable(cache_tokens=100, max_sessions=10, share=ClientShare(sessions, cache_tokens))


def refusal(table: SessionTable, session_id: str, **options: object) -> str:
    with pytest.raises(ProtocolError) as refused:
        open_session(table, session_id, **options)  # type: ignore[arg-type]
    assert refused.value.code == "busy"
    return refused.value.message


def test_one_connection_holds_at_most_its_share_of_sessions_and_cache() -> None:
    table = shared()
    for session_id in ("a", "b", "c"):
        open_session(table, session_id, owner=1)
    assert "3 sessions" in refusal(table, "d", owner=1)
    open_session(table, "d", owner=2, max_length=30)
    assert "share of 50" in refusal(table, "e", owner=2, max_length=30)
    open_session(table, "e", owner=2, max_length=20)  # 50 of 50


def test_a_clients_first_session_may_be_larger_than_its_share_when_the_node_has_room() -> None:
    """Else a node whose whole cache fits one long session would refuse it to everyone."""
    table = shared()
    open_session(table, "long", owner=1, max_length=80)
    assert "share" in refusal(table, "more", owner=1)
    assert "free" in refusal(table, "too-long", owner=2, max_length=30)


def test_connections_from_one_address_share_one_clients_limits() -> None:
    table = shared()
    open_session(table, "a", owner=1, max_length=20, address="203.0.113.7")
    open_session(table, "b", owner=2, max_length=20, address="203.0.113.7")
    assert "203.0.113.7" in refusal(table, "c", owner=3, max_length=20, address="203.0.113.7")
    open_session(table, "c", owner=3, max_length=20, address="198.51.100.1")
    open_session(table, "d", owner=4, max_length=20)  # loopback: each connection is a client of its own
    open_session(table, "e", owner=5, max_length=20)


def test_sessions_that_never_step_expire_after_the_first_step_timeout() -> None:
    table = SessionTable(cache_tokens=1000, max_sessions=8)
    open_session(table, "silent", now=0.0)
    open_session(table, "stepped", now=0.0).stepped = True
    assert table.expire(now=20.0, idle_timeout=300.0, first_step_timeout=30.0) == []
    assert table.expire(now=31.0, idle_timeout=300.0, first_step_timeout=30.0) == ["silent"]
    assert table.expire(now=299.0, idle_timeout=300.0, first_step_timeout=30.0) == []


def fill_with_two_clients(table: SessionTable) -> None:
    """Owners 1 and 2 take 50 tokens each at time 0; only owner 2's sessions have stepped."""
    for owner in (1, 2):
        for i in range(5):
            open_session(table, f"{owner}-{i}", owner=owner, now=float(i) / 10).stepped = owner == 2


def test_a_client_under_its_share_reclaims_sessions_that_never_stepped_from_a_full_node() -> None:
    table = shared(sessions=10)
    fill_with_two_clients(table)
    assert "10 sessions" in refusal(table, "honest", owner=3, max_length=20, now=RECLAIM_AFTER)
    assert table.reclaim(20, owner=3, address=None, now=RECLAIM_AFTER / 2) == []  # too fresh to be given up on
    released.clear()
    assert table.reclaim(20, owner=3, address=None, now=RECLAIM_AFTER + 1) == ["1-0", "1-1"]  # the oldest first
    assert released == ["1-0", "1-1"]
    open_session(table, "honest", owner=3, max_length=20, now=RECLAIM_AFTER + 1)


def test_reclaiming_never_takes_stepped_sessions_nor_a_clients_own_nor_helps_a_client_over_its_share() -> None:
    table = shared(sessions=10)
    fill_with_two_clients(table)
    later = RECLAIM_AFTER + 1
    assert table.reclaim(60, owner=3, address=None, now=later) == []  # 50 never stepped: not enough, none taken
    assert len(table) == 10
    with pytest.raises(ProtocolError, match="share"):
        table.reclaim(10, owner=1, address=None, now=later)
    for i in range(5):
        table.close(f"1-{i}")
    open_session(table, "4-0", owner=4, max_length=20).stepped = True
    for i in range(3):
        open_session(table, f"3-{i}", owner=3)
    assert table.reclaim(10, owner=3, address=None, now=later) == []  # its own sessions are not taken
    assert len(table) == 9 and table.tokens_free == 0
