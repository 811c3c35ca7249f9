"""The registry's soft state: heartbeats keep peers, silence and departures remove them."""

from __future__ import annotations

from swarm.registry.state import RegistryState
from tests.swarm.test_routing import peer


def test_peers_expire_after_missed_heartbeats() -> None:
    state = RegistryState()
    state.announce(peer("a", 0, 8), ttl=3.0, now=0.0)
    assert [p.peer_id for p in state.live_peers(now=2.9)] == ["a"]
    assert state.live_peers(now=3.1) == []
    state.announce(peer("a", 0, 8), ttl=3.0, now=3.2)
    assert [p.peer_id for p in state.live_peers(now=4.0)] == ["a"]


def test_departed_peers_are_shown_as_gone_then_forgotten() -> None:
    state = RegistryState(gone_retention=10.0)
    state.announce(peer("a", 0, 4), ttl=3.0, now=0.0)
    state.announce(peer("b", 4, 8), ttl=3.0, now=0.0)
    state.mark_gone("b", now=1.0)
    snapshot = state.snapshot(now=1.5)
    assert {p["peer_id"]: p["state"] for p in snapshot["peers"]} == {"a": "online", "b": "gone"}
    assert snapshot["models"][0]["missing"] == [[4, 8]]
    later = state.snapshot(now=12.0)
    assert [(p["peer_id"], p["state"]) for p in later["peers"]] == [("a", "gone")]
    assert later["models"] == []
    assert state.snapshot(now=14.0)["peers"] == []


def test_queries_filter_by_model() -> None:
    state = RegistryState()
    state.announce(peer("a", 0, 8), ttl=3.0, now=0.0)
    other = peer("b", 0, 8).model_copy(update={"model": "other"})
    state.announce(other, ttl=3.0, now=0.0)
    assert [p.peer_id for p in state.live_peers(now=1.0, model="other")] == ["b"]
    assert len(state.live_peers(now=1.0)) == 2
