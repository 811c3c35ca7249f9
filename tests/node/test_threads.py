"""Threads per round: small rounds on one thread where one measured no slower, the rest on every thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.node.sessions import SessionTable
from swarm.node.span import LoadedSpan
from swarm.node.steps import run_alone
from swarm.node.threads import MAX_SECONDS, ThreadPlan, measure
from swarm.node.validation import StepInputs
from tests.node.session_helpers import open_session


def timings(seconds: dict[tuple[int, int], float]) -> tuple[list[tuple[int, int]], object]:
    """A fake `time_round` that answers `seconds[(tokens, threads)]` and records what it was asked."""
    asked: list[tuple[int, int]] = []

    def time_round(tokens: int) -> float:
        asked.append((tokens, torch.get_num_threads()))
        return seconds[(tokens, torch.get_num_threads())]

    return asked, time_round


def test_one_thread_takes_the_sizes_where_it_is_no_slower_up_to_the_first_where_it_loses() -> None:
    asked, time_round = timings(
        {(1, 1): 0.001, (1, 4): 0.002, (8, 1): 0.003, (8, 4): 0.003, (64, 1): 0.02, (64, 4): 0.01}
    )
    plan = measure(time_round, threads=4)  # type: ignore[arg-type]
    assert plan == ThreadPlan(4, one_thread_up_to=8)
    assert [plan.for_tokens(tokens) for tokens in (1, 8, 9, 64, 500)] == [1, 1, 4, 4, 4]
    assert {threads for _, threads in asked} == {1, 4}  # each size timed on one thread and on all of them


def test_threads_that_save_less_than_a_tenth_lose_to_one_thread() -> None:
    _, time_round = timings({(1, 1): 0.0010, (1, 2): 0.00095, (8, 1): 0.004, (8, 2): 0.0035})
    assert measure(time_round, threads=2) == ThreadPlan(2, one_thread_up_to=1)  # type: ignore[arg-type]


def test_the_two_thread_counts_take_turns_so_each_pair_sees_the_same_machine() -> None:
    asked, time_round = timings({(1, 1): 0.001, (1, 2): 0.0001})
    measure(time_round, threads=2)  # type: ignore[arg-type]
    assert [threads for _, threads in asked] == [1, 2] * (len(asked) // 2)
    assert len(asked) >= 6  # a warm-up pair, then several measured ones


def test_a_machine_where_threads_always_win_keeps_them_for_every_round() -> None:
    _, time_round = timings({(1, 1): 0.002, (1, 2): 0.001})
    assert measure(time_round, threads=2) == ThreadPlan(2, one_thread_up_to=0)  # type: ignore[arg-type]


def test_a_size_whose_rounds_would_be_too_slow_is_not_measured() -> None:
    per_token = MAX_SECONDS / 30  # 8 tokens take under MAX_SECONDS, 64 would take twice it
    seconds = {(tokens, threads): tokens * per_token for tokens in (1, 8) for threads in (1, 2)}
    asked, time_round = timings(seconds)
    assert measure(time_round, threads=2) == ThreadPlan(2, one_thread_up_to=8)  # type: ignore[arg-type]
    assert all(tokens <= 8 for tokens, _ in asked)  # 64 never run


def test_a_single_threaded_node_measures_nothing() -> None:
    asked, time_round = timings({})
    assert measure(time_round, threads=1) == ThreadPlan(1)  # type: ignore[arg-type]
    assert asked == []


def test_a_plan_sets_the_threads_for_its_round_and_puts_them_back() -> None:
    before = torch.get_num_threads()
    plan = ThreadPlan(threads=before + 1, one_thread_up_to=4)
    try:
        with plan.applied(4):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == before
        with plan.applied(5):
            assert torch.get_num_threads() == before + 1
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_a_span_measures_its_plan_and_computes_the_same_on_either_thread_count(tiny_llama: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        span = LoadedSpan.load(tiny_llama, 0, 4, torch.device("cpu"), torch.float32, show_progress=False)
        plan = span.plan_threads()
        assert plan.threads == 2 and plan is span.threads
        assert torch.get_num_threads() == 2  # measuring leaves the node's own count as it was
        table = SessionTable(cache_tokens=10_000, max_sessions=4)
        prompt = torch.randn(1, 6, span.hidden_size, generator=torch.Generator().manual_seed(0))
        outputs = []
        for name, one_thread_up_to in (("all threads", 0), ("one thread", 1000)):
            span.threads = ThreadPlan(2, one_thread_up_to)
            session = open_session(span, table, name, 1)
            outputs.append(run_alone(span, session, StepInputs(prompt, torch.arange(6)[None], None, None)))
        torch.testing.assert_close(outputs[0], outputs[1])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tokens", [1, 64])
def test_measuring_a_round_gives_its_scratch_rows_back(tiny_llama: Path, tokens: int) -> None:
    span = LoadedSpan.load(tiny_llama, 0, 2, torch.device("cpu"), torch.float32, show_progress=False)
    open_session(span, SessionTable(cache_tokens=10_000, max_sessions=4), "open", 2, max_length=tokens)

    def rows_in_use() -> dict[int, list[int]]:
        return {size: [row for row, used in enumerate(slab.used) if used] for size, slab in span.cache.slabs.items()}

    before = rows_in_use()
    assert span._time_round(tokens) > 0
    assert rows_in_use() == before
