"""`ChainPlanner`: chains from the registries' current view, asked once for a burst of new sessions."""

from __future__ import annotations

import asyncio

import pytest

from swarm.client.core import planner as chain
from swarm.client.core.planner import ChainPlanner
from swarm.errors import RegistryUnavailableError, SwarmFullError
from swarm.protocol import PeerInfo
from swarm.registry.client import RouteNeeds
from tests.swarm.test_routing import peer


def test_concurrent_plans_share_one_registry_query_and_later_ones_ask_again(monkeypatch: pytest.MonkeyPatch) -> None:
    queries: list[str | None] = []

    async def fetch(
        registries: list[str], model: str | None, credentials: object, model_id: object, route: RouteNeeds, *_: object
    ) -> list[PeerInfo]:
        queries.append(model)
        await asyncio.sleep(0.05)
        return [peer("a", 0, 4), peer("b", 4, 8)]

    monkeypatch.setattr(chain, "fetch_peers", fetch)
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8)

    async def scenario() -> list[list[str]]:
        burst = await asyncio.gather(*(planner.plan() for _ in range(16)))
        later = await planner.plan()
        return [[link.peer.peer_id for link in plan] for plan in [*burst, later]]

    plans = asyncio.run(scenario())
    assert plans == [["a", "b"]] * 17
    assert queries == ["m", "m"]


def test_a_failed_query_fails_every_plan_waiting_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fetch(
        registries: list[str], model: str | None, credentials: object, model_id: object, route: RouteNeeds, *_: object
    ) -> list[PeerInfo]:
        await asyncio.sleep(0.01)
        raise RegistryUnavailableError("no registry answered")

    monkeypatch.setattr(chain, "fetch_peers", fetch)
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8)

    async def scenario() -> list[object]:
        return await asyncio.gather(*(planner.plan() for _ in range(3)), return_exceptions=True)

    assert all(isinstance(outcome, RegistryUnavailableError) for outcome in asyncio.run(scenario()))


def test_a_busy_peer_cools_down_briefly_and_a_failed_one_is_banned_longer_each_time() -> None:
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8)
    planner.cool_down("full", now=100.0)
    assert "full" in planner.banned(now=101.0) and "full" not in planner.banned(now=104.0)
    planner.cool_down("full", now=104.0)  # busy again: still a short pause, never a growing ban
    assert "full" not in planner.banned(now=108.0)
    assert planner.ban("broken", now=0.0) == chain.BAN_SECONDS
    assert planner.ban("broken", now=1.0) == 2 * chain.BAN_SECONDS


def test_a_liar_stays_banned_whatever_fails_next(monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[str] = []

    async def report(registries: list[str], peer_id: str, reason: str, credentials: object) -> None:
        reports.append(peer_id)

    monkeypatch.setattr(chain, "report_peer", report)
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8)

    async def scenario() -> None:
        planner.proven.add("liar")
        planner.ban_liar(peer("liar", 0, 8), "off by 0.3")
        await asyncio.sleep(0)
        planner.ban("liar")  # its link then fails over like any failed link

    asyncio.run(scenario())
    assert reports == ["liar"] and "liar" not in planner.proven
    assert planner.ban("liar") > chain.MAX_BAN_SECONDS


def fake_registry(monkeypatch: pytest.MonkeyPatch, swarm: list[PeerInfo]) -> list[RouteNeeds]:
    """A registry that honours a route query's exclusions; returns what it was asked."""
    asked: list[RouteNeeds] = []

    async def fetch(
        registries: list[str], model: str | None, credentials: object, model_id: object, route: RouteNeeds, *_: object
    ) -> list[PeerInfo]:
        asked.append(route)
        return [info for info in swarm if info.peer_id not in route.exclude]

    monkeypatch.setattr(chain, "fetch_peers", fetch)
    return asked


def test_route_queries_leave_out_the_peers_the_client_will_not_use(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_registry(monkeypatch, [peer("a", 0, 8), peer("b", 0, 8), peer("elsewhere", 0, 8, num_layers=16)])
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8)
    planner.ban("a")

    async def scenario() -> list[str]:
        first = await planner.plan(cache_tokens_needed=512)
        await planner.plan(avoid=frozenset({"c"}))
        return [link.peer.peer_id for link in first]

    assert asyncio.run(scenario()) == ["b"]
    assert asked[0] == RouteNeeds(cache_tokens=512, exclude=frozenset({"a"}))
    assert asked[1].exclude == {"a", "c", "elsewhere"}  # another layer count: not asked for again


def test_a_swarm_whose_only_peers_just_answered_busy_is_full_not_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_registry(monkeypatch, [peer("a", 0, 8)])
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8)
    planner.cool_down("a")
    with pytest.raises(SwarmFullError):
        asyncio.run(planner.plan())
    assert [route.exclude for route in asked] == [{"a"}, frozenset()]  # asked again, with the busy peer


def test_peers_the_client_refuses_do_not_hide_the_usable_ones_behind_them(monkeypatch: pytest.MonkeyPatch) -> None:
    crowd = [peer(f"other-{index}", 0, 8, num_layers=16) for index in range(3)]  # fast, first, unusable here
    asked: list[RouteNeeds] = []

    async def fetch(
        registries: list[str], model: str | None, credentials: object, model_id: object, route: RouteNeeds, *_: object
    ) -> list[PeerInfo]:
        asked.append(route)
        return [info for info in [*crowd, peer("good", 0, 8)] if info.peer_id not in route.exclude][:2]

    monkeypatch.setattr(chain, "fetch_peers", fetch)
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8)
    assert [link.peer.peer_id for link in asyncio.run(planner.plan())] == ["good"]
    assert [sorted(route.exclude) for route in asked] == [[], ["other-0", "other-1"]]  # refused: left out next time


def test_forwarded_chains_use_the_round_trips_peers_measured_to_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client is as near to both second-half peers; only the first peer's announcement tells them apart, and
    only for chains whose steps go node to node (sessions, by default; training and stateless passes go through
    the client)."""

    async def fetch(*_args: object) -> list[PeerInfo]:
        return [peer("a", 0, 4, latencies_ms={"far": 90.0, "near": 3.0}), peer("far", 4, 8), peer("near", 4, 8)]

    monkeypatch.setattr(chain, "fetch_peers", fetch)
    planner = ChainPlanner(["ws://127.0.0.1:7000"], "m", 8, round_trips={"a": 0.02, "far": 0.01, "near": 0.011})

    async def chains() -> list[list[str]]:
        plans = [await planner.plan(), await planner.plan(forwarded=False)]
        return [[link.peer.peer_id for link in plan] for plan in plans]

    assert asyncio.run(chains()) == [["a", "near"], ["a", "far"]]
    planner.forwarding = False
    assert [link.peer.peer_id for link in asyncio.run(planner.plan())] == ["a", "far"]
