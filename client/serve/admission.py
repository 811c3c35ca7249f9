"""Which request may start work on the gateway, and when, per API key.

A request is first counted against its key's limits (`Admission.enter`): requests in flight, requests per
minute. Over one, it is refused at once with a `RateLimitError` (429 with `Retry-After`). Admitted, it waits
for one of the gateway's `--max-concurrency` slots (`FairGate`), in which it is tokenized, charged its tokens
(prompt + what it may generate, against tokens per minute) and generated; when it ends, the charge becomes what
it used. The slots go round-robin by key, so a key that floods the gateway queues behind itself while another
key's request takes the next free slot.

Everything here runs on the event loop; the windows and the gate are plain bookkeeping, tested without HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from swarm.client.serve.errors import RateLimitError

MINUTE = 60.0


@dataclass(frozen=True)
class KeyLimits:
    """What each API key may use; None is no limit."""

    concurrency: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class Spending:
    """One charge against a `MinuteWindow`, which `settle` may lower to what was really used."""

    def __init__(self, at: float, amount: int) -> None:
        self.at = at
        self.amount = amount


class MinuteWindow:
    """What one key spent in the last minute (a sliding window), to refuse what would go over `budget` and to
    say when it would fit."""

    def __init__(self, budget: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.clock = clock
        self.spent: deque[Spending] = deque()

    def wait_for(self, amount: int) -> float:
        """Seconds until `amount` more fits (0: it fits now; a minute for more than the whole budget)."""
        now = self.clock()
        while self.spent and self.spent[0].at <= now - MINUTE:
            self.spent.popleft()
        if amount > self.budget:
            return MINUTE
        total, wait = sum(spending.amount for spending in self.spent), 0.0
        for spending in self.spent:  # oldest first: each one's expiry frees its amount
            if total + amount <= self.budget:
                break
            total -= spending.amount
            wait = spending.at + MINUTE - now
        return wait

    def spend(self, amount: int) -> Spending:
        spending = Spending(self.clock(), amount)
        self.spent.append(spending)
        return spending


class FairGate:
    """At most `capacity` holders. While all slots are taken, a freed one goes to the waiting key that holds the
    fewest, then to the one served least recently: round-robin by key, each key's requests in arrival order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: Counter[str] = Counter()
        self.waiting: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self.last_served: dict[str, int] = {}
        self._ticks = itertools.count()

    async def acquire(self, key: str) -> None:
        if not self.waiting and self.held.total() < self.capacity:
            self._grant(key)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (next(self._ticks), future)
        self.waiting.setdefault(key, deque()).append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # the slot was handed over as the waiter left: pass it on
            else:
                self._forget(key, entry)
            raise

    def release(self, key: str) -> None:
        self.held[key] -= 1
        if self.held[key] <= 0:
            del self.held[key]
        while self.waiting and self.held.total() < self.capacity:
            chosen = min(self.waiting, key=lambda waiting: (self.held[waiting], self.last_served.get(waiting, -1)))
            queue = self.waiting[chosen]
            _, future = queue.popleft()
            if not queue:
                del self.waiting[chosen]
            self._grant(chosen)
            future.set_result(None)

    def _grant(self, key: str) -> None:
        self.held[key] += 1
        self.last_served[key] = next(self._ticks)

    def _forget(self, key: str, entry: tuple[int, asyncio.Future[None]]) -> None:
        queue = self.waiting.get(key)
        if queue is not None and entry in queue:
            queue.remove(entry)
            if not queue:
                del self.waiting[key]


class Admission:
    """The gateway's per-key limits and its fair generation slots."""

    def __init__(self, capacity: int, limits: KeyLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.gate = FairGate(capacity)
        self.in_flight: Counter[str] = Counter()
        self.requests: dict[str, MinuteWindow] = {}
        self.tokens: dict[str, MinuteWindow] = {}

    def enter(self, key: str) -> Ticket:
        """Count a new request of `key`, or refuse it when the key is at one of its limits."""
        limits = self.limits
        if limits.concurrency is not None and self.in_flight[key] >= limits.concurrency:
            raise RateLimitError(
                f"this API key already has {limits.concurrency} request(s) in flight, its limit; "
                "retry when one has ended",
                retry_after=1.0,
            )
        if limits.requests_per_minute is not None:
            window = self.requests.setdefault(key, MinuteWindow(limits.requests_per_minute, self.clock))
            wait = window.wait_for(1)
            if wait > 0:
                raise RateLimitError(
                    f"this API key may send {limits.requests_per_minute} requests per minute; retry in {wait:.0f} s",
                    retry_after=wait,
                )
            window.spend(1)
        self.in_flight[key] += 1
        return Ticket(self, key)


class Ticket:
    """One admitted request: it holds a slot once `slot()` returns and a token charge once `charge()`d; `close()`
    gives both back (once, however often it is called)."""

    def __init__(self, admission: Admission, key: str) -> None:
        self.admission = admission
        self.key = key
        self.holds_slot = False
        self.closed = False
        self.charged: Spending | None = None

    async def slot(self) -> None:
        await self.admission.gate.acquire(self.key)
        self.holds_slot = True

    def charge(self, tokens: int) -> None:
        """Count `tokens` against the key's tokens per minute, or refuse the request."""
        budget = self.admission.limits.tokens_per_minute
        if budget is None:
            return
        window = self.admission.tokens.setdefault(self.key, MinuteWindow(budget, self.admission.clock))
        wait = window.wait_for(tokens)
        if tokens > budget:
            raise RateLimitError(
                f"this request may take {tokens} tokens (prompt + max_tokens for every choice), more than this API "
                f"key's {budget} tokens per minute; ask for fewer tokens",
                retry_after=MINUTE,
            )
        if wait > 0:
            raise RateLimitError(
                f"this API key may use {budget} tokens per minute and this request may take {tokens}; "
                f"retry in {wait:.0f} s",
                retry_after=wait,
            )
        self.charged = window.spend(tokens)

    def settle(self, used: int) -> None:
        """The request is done: its charge becomes the tokens it really used."""
        if self.charged is not None:
            self.charged.amount = min(self.charged.amount, used)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        admission = self.admission
        admission.in_flight[self.key] -= 1
        if admission.in_flight[self.key] <= 0:
            del admission.in_flight[self.key]
        if self.holds_slot:
            admission.gate.release(self.key)
