"""The registry's soft state: heartbeats keep peers, silence and departures remove them; only a peer's own
connection changes its entry, and every collection in it is bounded."""

from __future__ import annotations

import pytest

from swarm.errors import ErrorCode, ProtocolError
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


def test_a_peer_id_is_changed_only_by_the_connection_that_holds_it() -> None:
    state = RegistryState()
    assert state.announce(peer("a", 0, 8), ttl=3.0, now=0.0, owner="node")
    assert not state.announce(peer("a", 0, 8), ttl=3.0, now=1.0, owner="node")  # a heartbeat, not news
    for intrusion in (
        lambda: state.announce(peer("a", 0, 4), ttl=3.0, now=1.0, owner="intruder"),
        lambda: state.leave("a", now=1.0, owner="intruder"),
    ):
        with pytest.raises(ProtocolError) as refused:
            intrusion()
        assert refused.value.code is ErrorCode.UNAUTHORIZED
    assert [(p.peer_id, p.end) for p in state.live_peers(now=1.5)] == [("a", 8)]
    assert state.disconnect("node", now=2.0) == ["a"]
    assert state.live_peers(now=2.0) == []
    assert state.announce(peer("a", 0, 8), ttl=3.0, now=2.5, owner="reconnected")


def test_a_full_registry_forgets_its_longest_gone_peer_then_refuses_with_busy() -> None:
    state = RegistryState(max_peers=3)
    for name in "abc":
        state.announce(peer(name, 0, 8), ttl=30.0, now=0.0)
    state.mark_gone("b", now=1.0)
    state.mark_gone("a", now=2.0)
    state.announce(peer("d", 0, 8), ttl=30.0, now=3.0)
    assert sorted(row.info.peer_id for row in state.view(now=3.0).rows) == ["a", "c", "d"]
    state.announce(peer("e", 0, 8), ttl=30.0, now=3.0)
    with pytest.raises(ProtocolError) as refused:
        state.announce(peer("f", 0, 8), ttl=30.0, now=3.0)
    assert refused.value.code is ErrorCode.BUSY
    state.announce(peer("c", 0, 8), ttl=30.0, now=3.0)  # peers already kept still refresh


def test_a_new_model_beyond_the_limit_is_refused_with_busy_until_one_goes() -> None:
    state = RegistryState(max_models=2)
    state.announce(peer("a", 0, 8), ttl=30.0, now=0.0)
    state.announce(peer("b", 0, 8).model_copy(update={"model": "other"}), ttl=30.0, now=0.0)
    third = peer("c", 0, 8).model_copy(update={"model": "third"})
    with pytest.raises(ProtocolError) as refused:
        state.announce(third, ttl=30.0, now=0.0)
    assert refused.value.code is ErrorCode.BUSY
    state.announce(peer("d", 0, 4), ttl=30.0, now=0.0)  # a model already served takes more peers
    state.mark_gone("b", now=1.0)
    state.announce(third, ttl=30.0, now=1.0)


def test_the_state_page_lists_live_peers_first_up_to_its_limit_and_counts_the_rest() -> None:
    state = RegistryState()
    for index in range(5):
        state.announce(peer(f"p{index}", 0, 8), ttl=30.0, now=0.0)
    state.mark_gone("p0", now=1.0)
    snapshot = state.snapshot(now=1.0, max_listed=3)
    assert [p["state"] for p in snapshot["peers"]] == ["online"] * 3
    assert snapshot["peers_unlisted"] == 2
    assert snapshot["models"][0]["peers"] == 4


def test_queries_for_a_checkpoint_get_only_the_peers_serving_it() -> None:
    state = RegistryState()
    mine, theirs = "a" * 32, "b" * 32
    state.announce(peer("a", 0, 8).model_copy(update={"model_id": mine}), ttl=3.0, now=0.0)
    state.announce(peer("b", 0, 8).model_copy(update={"model_id": theirs}), ttl=3.0, now=0.0)
    assert [p.peer_id for p in state.live_peers(now=1.0, model="m", model_id=mine)] == ["a"]
    assert {p.peer_id for p in state.live_peers(now=1.0, model="m")} == {"a", "b"}


def test_a_peer_reported_by_enough_independent_clients_is_left_out_of_queries() -> None:
    state = RegistryState(reports_to_exclude=2)
    state.announce(peer("liar", 0, 8), ttl=30.0, now=0.0)
    state.announce(peer("honest", 0, 8), ttl=30.0, now=0.0)
    assert not state.report("liar", "10.0.0.1")
    assert not state.report("liar", "10.0.0.1")  # the same client twice is one report
    assert [p.peer_id for p in state.live_peers(now=1.0)] == ["liar", "honest"]
    assert state.report("liar", "10.0.0.2")
    assert [p.peer_id for p in state.live_peers(now=1.0)] == ["honest"]
    assert {p["peer_id"]: p["state"] for p in state.snapshot(now=1.0)["peers"]}["liar"] == "reported"
    assert not state.report("nobody-knows", "10.0.0.3")  # reports of unknown peers are not kept


def test_peers_are_found_by_the_address_they_announce_while_they_live() -> None:
    state = RegistryState()
    a, b = peer("a", 0, 4), peer("b", 4, 8).model_copy(update={"address": peer("a", 0, 4).address})
    state.announce(a, ttl=3.0, now=0.0)
    state.announce(b, ttl=1.0, now=0.0)
    state.announce(peer("c", 0, 8), ttl=3.0, now=0.0)
    assert [p.peer_id for p in state.live_at(0.5, a.address, None, None)] == ["a", "b"]
    assert [p.peer_id for p in state.live_at(0.5, a.address, "other", None)] == []
    assert [p.peer_id for p in state.live_at(1.5, a.address, None, None)] == ["a"]  # b expired
    state.announce(a.model_copy(update={"address": "ws://elsewhere:1"}), ttl=3.0, now=2.0)  # a moved
    assert state.live_at(2.0, a.address, None, None) == []
    assert [p.peer_id for p in state.live_at(2.0, "ws://elsewhere:1", "m", None)] == ["a"]
    state.leave("a", now=2.5)
    assert state.live_at(2.5, "ws://elsewhere:1", None, None) == []
