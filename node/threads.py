"""How many torch threads a round of layers runs on: one for rounds too small to pay for waking the others.

A node's idle OpenMP threads sleep between steps (`OMP_WAIT_POLICY=PASSIVE`, `swarm.node.main`): the client and
the other nodes on the machine need the cores then. Every parallel operation of a round then wakes them and
waits for them, and on a small round that costs more than they gain. Measured on a 2-core machine, a 4-layer
decode step of a hidden-64 model took 0.34 ms on one thread and 0.8 to 1.0 ms on two; hidden 512: 4.2 to 5.9
ms against 6.6 to 7.1 ms; hidden 1024 about the same on either. Long prompts gain from every thread. Where the
line falls depends on the model and the machine, so a node measures it on its own layers when it starts
(`measure`), and runs the rounds below it on one thread (`ThreadPlan.applied`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

SIZES = (1, 8, 64)
"""Round sizes measured, in tokens (rows x new tokens): a decode step, a small batch, a prompt chunk."""

MAX_SECONDS = 0.5
"""A size whose rounds would take longer than this (judged from the last size, in proportion) is not measured:
it and larger ones keep every thread, and a big model on a slow machine starts without seconds of measuring."""

SECONDS_PER_SIZE = 0.3
"""Pairs of rounds of one size are taken until this much time has gone (at least one pair)."""

GAIN_NEEDED = 0.9
"""All threads win a size when a round on them takes less than this share of a round on one."""


@dataclass(frozen=True)
class ThreadPlan:
    """Rounds of at most `one_thread_up_to` tokens run on one thread, larger ones on `threads`."""

    threads: int
    """The node's thread count: `--torch-threads`, or torch's own choice (the physical cores)."""
    one_thread_up_to: int = 0

    def for_tokens(self, tokens: int) -> int:
        return 1 if tokens <= self.one_thread_up_to else self.threads

    @contextmanager
    def applied(self, tokens: int) -> Iterator[None]:
        """Run the body with the thread count for a round of `tokens` (on the calling thread)."""
        wanted = self.for_tokens(tokens)
        previous = torch.get_num_threads()
        if wanted == previous:
            yield
            return
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def describe(self) -> str:
        if self.threads == 1 or self.one_thread_up_to == 0:
            return f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"{self.threads} threads, 1 for rounds of up to {self.one_thread_up_to} tokens"


def measure(time_round: Callable[[int], float], threads: int, sizes: tuple[int, ...] = SIZES) -> ThreadPlan:
    """The plan for rounds timed by `time_round(tokens)` (seconds of one round of that many tokens, on the calling
    thread): one thread from the smallest size up to the last where `threads` did not save a tenth of the time.

    The two thread counts take turns, round by round, and each pair is compared on its own: nodes that start
    together measure while the others load and measure, and a pair taken side by side sees the same machine.
    Threads must save a tenth to win, since every thread they wake is a core the client or another node may
    need."""
    if threads <= 1:
        return ThreadPlan(threads)
    up_to, seconds_per_token = 0, 0.0
    for size in sizes:
        if size * seconds_per_token > MAX_SECONDS:
            break
        alone, together = _paired_seconds(time_round, size, threads)
        if statistics.median(t / a for a, t in zip(alone, together, strict=True)) < GAIN_NEEDED:
            break
        up_to = size
        seconds_per_token = statistics.median(alone) / size
    return ThreadPlan(threads, up_to)


def _paired_seconds(
    time_round: Callable[[int], float], tokens: int, threads: int, pairs: int = 5
) -> tuple[list[float], list[float]]:
    """Seconds of `pairs` rounds on one thread and as many on `threads`, taken in turn."""
    previous = torch.get_num_threads()
    alone: list[float] = []
    together: list[float] = []
    began = time.perf_counter()
    try:
        for pair in range(pairs + 1):  # the first pair warms up: a thread count's first round starts its threads
            torch.set_num_threads(1)
            one = time_round(tokens)
            torch.set_num_threads(threads)
            several = time_round(tokens)
            if pair:
                alone.append(one)
                together.append(several)
                if time.perf_counter() - began > SECONDS_PER_SIZE:
                    break
    finally:
        torch.set_num_threads(previous)
    return alone, together
