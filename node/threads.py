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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

SIZES = (1, 8, 64)
"""Round sizes measured, in tokens (rows x new tokens): a decode step, a small batch, a prompt chunk."""

MAX_SECONDS = 0.25
"""A round that takes longer than this is not measured again at a larger size: larger rounds keep every
thread, and a big model on a slow machine starts without seconds of measuring."""


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
    thread): one thread up to the largest size where it was no slower than `threads`, from the smallest up."""
    if threads <= 1:
        return ThreadPlan(threads)
    up_to = 0
    for size in sizes:
        alone, together = _median_seconds(time_round, size, 1), _median_seconds(time_round, size, threads)
        if alone > together:
            break
        up_to = size
        if max(alone, together) > MAX_SECONDS:
            break
    return ThreadPlan(threads, up_to)


def _median_seconds(time_round: Callable[[int], float], tokens: int, threads: int, repeats: int = 3) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        time_round(tokens)  # warm-up: the first round on a thread count starts its threads
        return statistics.median(time_round(tokens) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)
