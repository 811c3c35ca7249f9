"""The bookkeeping behind per-key limits, without HTTP: sliding minute windows and the fair gate's slots."""

from __future__ import annotations

import asyncio

import pytest

from swarm.client.serve.admission import Admission, FairGate, KeyLimits, MinuteWindow
from swarm.client.serve.errors import RateLimitError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_minute_window_says_when_an_amount_fits_again() -> None:
    clock = Clock()
    window = MinuteWindow(100, clock)
    window.spend(60)
    clock.now += 20
    window.spend(30)
    assert window.wait_for(10) == 0
    assert window.wait_for(20) == pytest.approx(40)  # when the first 60 expire
    assert window.wait_for(101) == 60  # more than the budget never fits: a minute, as OpenAI answers
    clock.now += 40
    assert window.wait_for(70) == 0


def test_settling_a_charge_gives_back_what_was_not_used() -> None:
    clock = Clock()
    admission = Admission(1, KeyLimits(tokens_per_minute=100), clock)
    ticket = admission.enter("k")
    ticket.charge(90)
    with pytest.raises(RateLimitError):
        admission.enter("k").charge(20)
    ticket.settle(30)
    admission.enter("k").charge(70)


def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_the_slot_on() -> None:
    async def scenario() -> dict[str, int]:
        gate = FairGate(1)
        await gate.acquire("a")
        leaving = asyncio.create_task(gate.acquire("b"))
        staying = asyncio.create_task(gate.acquire("c"))
        await asyncio.sleep(0)
        gate.release("a")  # hands the slot to b, which is cancelled before it runs
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        await asyncio.wait_for(staying, 1)
        return dict(gate.held)

    assert asyncio.run(scenario()) == {"c": 1}
