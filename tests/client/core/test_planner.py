"""`ChainPlanner`: chains from the registries' current view, asked once for a burst of new sessions."""

from __future__ import annotations

import asyncio

import pytest

from swarm.client.core import planner as chain
from swarm.client.core.planner import ChainPlanner
from swarm.errors import RegistryUnavailableError
from swarm.protocol import PeerInfo
from tests.swarm.test_routing import peer


def test_concurrent_plans_share_one_registry_query_and_later_ones_ask_again(monkeypatch: pytest.MonkeyPatch) -> None:
    queries: list[str | None] = []

    async def fetch(registries: list[str], model: str | None, credentials: object) -> list[PeerInfo]:
        queries.append(model)
        await asyncio.sleep(0.05)
        return [peer("a", 0, 4), peer("b", 4, 8)]

    monkeypatch.setattr(chain, "fetch_peers", fetch)
    planner = ChainPlanner(["ws://registry"], "m", 8)

    async def scenario() -> list[list[str]]:
        burst = await asyncio.gather(*(planner.plan() for _ in range(16)))
        later = await planner.plan()
        return [[link.peer.peer_id for link in plan] for plan in [*burst, later]]

    plans = asyncio.run(scenario())
    assert plans == [["a", "b"]] * 17
    assert queries == ["m", "m"]


def test_a_failed_query_fails_every_plan_waiting_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fetch(registries: list[str], model: str | None, credentials: object) -> list[PeerInfo]:
        await asyncio.sleep(0.01)
        raise RegistryUnavailableError("no registry answered")

    monkeypatch.setattr(chain, "fetch_peers", fetch)
    planner = ChainPlanner(["ws://registry"], "m", 8)

    async def scenario() -> list[object]:
        return await asyncio.gather(*(planner.plan() for _ in range(3)), return_exceptions=True)

    assert all(isinstance(outcome, RegistryUnavailableError) for outcome in asyncio.run(scenario()))
