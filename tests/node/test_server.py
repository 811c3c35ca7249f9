"""Where `NodeServer` runs compute: quick steps stay on the event loop while they are fast and the compute
thread is idle; everything else goes to the compute thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from node.server import INLINE_SECONDS, NodeIdentity, NodeServer
from node.settings import NodeSettings
from swarm.errors import ProtocolError


def server() -> NodeServer:
    identity = NodeIdentity("node", "model", 8, 0, 4, torch.float32, 64)
    return NodeServer(NodeSettings(registry=["ws://127.0.0.1:9"]), identity)


def thread_name() -> str:
    return threading.current_thread().name


def test_quick_work_runs_on_the_loop_and_other_work_on_the_compute_thread() -> None:
    node = server()

    async def scenario() -> list[str]:
        loop_thread = thread_name()
        names = [await node._compute(thread_name, quick=True), await node._compute(thread_name)]
        return [name == loop_thread for name in names]

    assert asyncio.run(scenario()) == [True, False]


def test_quick_work_moves_to_the_compute_thread_once_it_is_slow() -> None:
    node = server()

    def slow() -> str:
        time.sleep(INLINE_SECONDS * 6)
        return thread_name()

    async def scenario() -> list[bool]:
        loop_thread = thread_name()
        return [await node._compute(slow, quick=True) == loop_thread for _ in range(3)]

    assert asyncio.run(scenario()) == [True, False, False]


def test_quick_work_waits_its_turn_while_the_compute_thread_is_busy() -> None:
    node = server()
    release = threading.Event()

    async def scenario() -> tuple[str, str]:
        busy = asyncio.ensure_future(node._compute(lambda: release.wait(5) and thread_name()))
        await asyncio.sleep(0.05)
        quick = asyncio.ensure_future(node._compute(thread_name, quick=True))
        await asyncio.sleep(0.05)
        assert not quick.done()  # it queued behind the busy thread instead of running beside it
        release.set()
        return await busy, await quick

    busy, quick = asyncio.run(scenario())
    assert busy == quick != threading.main_thread().name


def test_work_past_the_step_timeout_fails_with_an_internal_error() -> None:
    identity = NodeIdentity("node", "model", 8, 0, 4, torch.float32, 64)
    node = NodeServer(NodeSettings(registry=["ws://127.0.0.1:9"], step_timeout=0.5), identity)

    async def scenario() -> str:
        with pytest.raises(ProtocolError) as caught:
            await node._compute(time.sleep, 0.8)
        assert caught.value.code == "internal" and "longer than" in caught.value.message
        # the thread still runs the late step: quick work waits for it instead of running beside it
        return await node._compute(thread_name, quick=True)

    began = time.perf_counter()
    assert asyncio.run(scenario()) != threading.main_thread().name
    assert time.perf_counter() - began < 3.0
