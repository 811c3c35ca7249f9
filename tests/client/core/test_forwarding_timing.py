"""How a forwarded step times each link's compute from when the answers arrived (`client/core/forwarding.py`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from swarm.client.core.forwarding import observe_link_compute
from swarm.client.core.links import LinkInputs
from swarm.client.core.planner import ChainPlanner
from swarm.client.core.sessions import ChainSession
from swarm.routing import Link
from tests.swarm.test_routing import peer


def session_over(*peers: object) -> ChainSession:
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8)
    session = ChainSession(planner, channels=None, max_length=16, batch_size=1)  # type: ignore[arg-type]
    session.links = [SimpleNamespace(link=Link(p, p.start, p.end)) for p in peers]  # type: ignore[attr-defined, misc]
    return session


def step_of(tokens: int) -> LinkInputs:
    mask = torch.ones(1, tokens, dtype=torch.bool)
    return LinkInputs(torch.zeros(1, tokens, 8), torch.zeros(1, tokens, dtype=torch.long), mask, None)


def test_the_first_link_is_its_wait_less_its_round_trip_and_a_later_one_less_the_junction_and_trips_back() -> None:
    first, second = peer("a", 0, 4, latencies_ms={"b": 6.0}), peer("b", 4, 8)
    session = session_over(first, second)
    session.planner.round_trips.update({"a": 0.010, "b": 0.030})
    arrived = {0: 1.018, 1: 1.038}  # sent at 1.000
    observe_link_compute(session, 0, step_of(1), 1.0, arrived)
    observe_link_compute(session, 1, step_of(1), 1.0, arrived)
    # a: 18 ms less its 10 ms round trip, over 4 layers; b: 20 ms less the 3 ms junction and (30 - 10) / 2 ms
    assert session.planner.layer_seconds["a"] == pytest.approx(0.008 / 4)
    assert session.planner.layer_seconds["b"] == pytest.approx(0.007 / 4)


def test_a_link_after_an_unmeasured_junction_is_not_timed_nor_is_a_prefill() -> None:
    session = session_over(peer("a", 0, 4), peer("b", 4, 8))
    session.planner.round_trips.update({"a": 0.010, "b": 0.030})
    observe_link_compute(session, 1, step_of(1), 1.0, {0: 1.018, 1: 1.038})
    observe_link_compute(session, 0, step_of(5), 1.0, {0: 1.5})
    assert session.planner.layer_seconds == {}


def test_a_wait_shorter_than_the_round_trip_is_not_free_compute_but_brings_the_round_trip_down() -> None:
    session = session_over(peer("a", 0, 8))
    session.planner.round_trips["a"] = 0.060  # a slow handshake
    observe_link_compute(session, 0, step_of(1), 1.0, {0: 1.030})
    assert "a" not in session.planner.layer_seconds
    assert session.planner.round_trips["a"] == pytest.approx(0.030)  # the wait bounds the round trip
    observe_link_compute(session, 0, step_of(1), 2.0, {0: 2.034})  # the next step is timed against it
    assert session.planner.layer_seconds["a"] == pytest.approx(0.004 / 8)


def test_a_later_link_shorter_than_its_trips_is_not_timed_and_leaves_the_round_trips_alone() -> None:
    first, second = peer("a", 0, 4, latencies_ms={"b": 6.0}), peer("b", 4, 8)
    session = session_over(first, second)
    session.planner.round_trips.update({"a": 0.010, "b": 0.030})
    observe_link_compute(session, 1, step_of(1), 1.0, {0: 1.018, 1: 1.020})  # 2 ms after a: under the 13 ms trips
    assert "b" not in session.planner.layer_seconds
    assert session.planner.round_trips == {"a": 0.010, "b": 0.030}
