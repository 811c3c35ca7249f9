"""Batched decode steps give each session exactly what it gets alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from node import batching
from node.batching import PendingStep, StepBatcher, can_batch, run_alone, run_batched
from node.sessions import Session, SessionTable
from node.span import LoadedSpan
from node.validation import StepInputs


def step_inputs(hidden: torch.Tensor, start: int) -> StepInputs:
    batch, tokens = hidden.shape[:2]
    positions = torch.arange(start, start + tokens).expand(batch, tokens)
    return StepInputs(hidden, positions, torch.ones(batch, tokens, dtype=torch.bool), None)


def prefilled(span: LoadedSpan, table: SessionTable, tag: str, prompts: list[torch.Tensor]) -> list[Session]:
    """One session over layers 2-5 per prompt (hidden states [batch, tokens, 64]), each prefilled alone."""
    sessions = [
        table.open(f"{tag}{i}", 1, (2, 6), 64, prompt.shape[0], 0.0, span.new_cache) for i, prompt in enumerate(prompts)
    ]
    for session, prompt in zip(sessions, prompts, strict=True):
        run_alone(span, session, step_inputs(prompt, 0))
    return sessions


def test_batched_decode_equals_each_session_alone(tiny_llama: Path) -> None:
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    generator = torch.Generator().manual_seed(0)
    prefills = [torch.randn(b, n, 64, generator=generator) for b, n in ((1, 3), (2, 11), (1, 7))]
    decodes = [torch.randn(p.shape[0], 1, 64, generator=generator) for p in prefills]

    alone_sessions, batched_sessions = prefilled(span, table, "a", prefills), prefilled(span, table, "b", prefills)
    alone = [run_alone(span, s, step_inputs(d, s.length)) for s, d in zip(alone_sessions, decodes, strict=True)]

    async def pending() -> list[PendingStep]:
        return [PendingStep(s, step_inputs(d, s.length)) for s, d in zip(batched_sessions, decodes, strict=True)]

    steps = asyncio.run(pending())
    assert can_batch(steps)
    batched = run_batched(span, steps)
    for one, many in zip(alone, batched, strict=True):
        torch.testing.assert_close(many, one, atol=1e-5, rtol=0)
    for a, b in zip(alone_sessions, batched_sessions, strict=True):
        assert a.length == b.length and torch.equal(a.attention_mask, b.attention_mask)
        for index in range(2, 6):
            torch.testing.assert_close(b.cache.layers[index].keys, a.cache.layers[index].keys, atol=1e-5, rtol=0)
    # the next step after a batched one still matches, so the caches were written back correctly
    follow = [torch.randn(p.shape[0], 1, 64, generator=generator) for p in prefills]
    for a, b, hidden in zip(alone_sessions, batched_sessions, follow, strict=True):
        torch.testing.assert_close(
            run_alone(span, b, step_inputs(hidden, b.length)),
            run_alone(span, a, step_inputs(hidden, a.length)),
            atol=1e-5,
            rtol=0,
        )


def test_a_lone_quick_step_runs_in_its_own_request_and_steps_that_came_together_batch(tiny_llama: Path) -> None:
    """With nothing queued or running, a decode step that came alone has nobody to batch with: it skips the
    queue and the worker's turn. Steps of one frame, or arriving while a round runs, queue up and batch."""
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    sessions = prefilled(span, table, "s", [torch.randn(1, 4, 64) for _ in range(3)])
    ran_in: list[tuple[asyncio.Task, int]] = []
    release = asyncio.Event()
    inline_allowed = True
    batcher: StepBatcher

    async def compute(function, *args, quick: bool = False):
        task = asyncio.current_task()
        ran_in.append((task, len(args[1]) if function is run_batched else 1))  # type: ignore[arg-type]
        if task is batcher._worker and not inline_allowed and not release.is_set():
            await release.wait()  # this round holds the compute thread until released
        return function(*args)

    async def scenario() -> list[tuple[str, int]]:
        nonlocal inline_allowed, batcher
        batcher = StepBatcher(compute, lambda: span, lambda size: None, runs_inline=lambda: inline_allowed)

        def decode(session, name: str, alone: bool = True) -> asyncio.Task:
            inputs = step_inputs(torch.randn(1, 1, 64), session.length)
            return asyncio.create_task(batcher.submit(session, inputs, alone=alone), name=name)

        await decode(sessions[0], "lone")  # nothing else around: computed inside its own request
        # steps that arrived together (one step_many frame) are not alone: they wait for the worker and batch
        await asyncio.gather(decode(sessions[1], "frame-1", alone=False), decode(sessions[2], "frame-2", alone=False))
        inline_allowed = False
        first = decode(sessions[0], "queued")  # the compute thread is busy: it goes through the worker
        await asyncio.sleep(0.01)
        inline_allowed = True  # even where inline compute is allowed, a running round makes the others queue
        late = [decode(sessions[1], "late-1"), decode(sessions[2], "late-2")]
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, *late)
        return [("worker" if task is batcher._worker else task.get_name(), size) for task, size in ran_in]

    assert asyncio.run(scenario()) == [("lone", 1), ("worker", 2), ("worker", 1), ("worker", 2)]


def test_sessions_that_keep_stepping_together_reuse_the_merged_cache_and_stay_exact(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a batched round each session's cache is a view of its rows of the merged cache, so the same
    sessions stepping together again skip the merge. A session stepping alone, leaving the batch, or with a
    length far from the others' falls back to caches of its own; every output stays what it is alone."""
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=10_000, max_sessions=16)
    generator = torch.Generator().manual_seed(1)
    shapes = ((1, 3), (2, 5), (1, 4), (1, 40))
    prefills = [torch.randn(b, n, 64, generator=generator) for b, n in shapes]
    merges = []
    real_merged = batching._merged
    monkeypatch.setattr(batching, "_merged", lambda *args: merges.append(1) or real_merged(*args))

    alone, batched = prefilled(span, table, "a", prefills), prefilled(span, table, "b", prefills)

    def views(session) -> bool:
        return all(batching._is_slice(session.cache.layers[i].keys) for i in range(2, 6))

    async def pending(chosen: list[int], hidden: list[torch.Tensor]) -> list[PendingStep]:
        return [PendingStep(batched[i], step_inputs(h, batched[i].length)) for i, h in zip(chosen, hidden, strict=True)]

    shared = batching.SharedCaches()

    def round_(chosen: list[int]) -> int:
        """Steps `chosen` sessions batched and alone, checks they agree; returns how many layers were merged."""
        merges.clear()
        hidden = [torch.randn(prefills[i].shape[0], 1, 64, generator=generator) for i in chosen]
        expected = [
            run_alone(span, alone[i], step_inputs(h, alone[i].length)) for i, h in zip(chosen, hidden, strict=True)
        ]
        steps = asyncio.run(pending(chosen, hidden))
        got = run_batched(span, steps, shared)
        for one, many in zip(expected, got, strict=True):
            torch.testing.assert_close(many, one, atol=1e-5, rtol=0)
        return len(merges)

    assert round_([0, 1, 2]) == 4  # first round: merged, one call per layer
    assert all(views(batched[i]) for i in (0, 1, 2))
    assert round_([0, 1, 2]) == 0  # the same sessions again: the previous round's merged cache is used as is
    assert round_([0, 1, 2]) == 0
    assert round_([0, 2]) == 4  # session 1 left: merged again, and it got caches of its own
    assert not views(batched[1]) and views(batched[0])
    lone = torch.randn(1, 1, 64, generator=generator)
    for side in (alone, batched):  # session 0 steps alone ...
        run_alone(span, side[0], step_inputs(lone, side[0].length))
    assert round_([0, 1, 2]) == 4  # ... so its cache is no longer a view: merged again
    assert round_([0, 1, 2]) == 0
    assert round_([0, 3]) == 4  # 40 tokens beside 5: views would keep too much padding, so none are made
    assert not views(batched[3])
    for a, b in zip(alone, batched, strict=True):
        for index in range(2, 6):
            torch.testing.assert_close(b.cache.layers[index].keys, a.cache.layers[index].keys, atol=1e-5, rtol=0)


def test_small_batched_rounds_may_skip_the_compute_thread_and_large_ones_do_not(tiny_llama: Path) -> None:
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=100_000, max_sessions=8)
    rounds: list[tuple[int, bool]] = []

    async def compute(function, *args, quick: bool = False):
        if function is run_batched:
            rounds.append((sum(step.session.batch_size for step in args[1]), quick))
        return function(*args)

    async def scenario() -> None:
        batcher = StepBatcher(compute, lambda: span, lambda size: None)
        for rows in (1, batching.QUICK_BATCH_ROWS // 2 + 1):
            pair = prefilled(span, table, f"{rows}-", [torch.randn(rows, 2, 64) for _ in range(2)])
            steps = [(session, step_inputs(torch.randn(rows, 1, 64), session.length)) for session in pair]
            await asyncio.gather(*(batcher.submit(session, inputs) for session, inputs in steps))

    asyncio.run(scenario())
    assert rounds == [(2, True), (2 * (batching.QUICK_BATCH_ROWS // 2 + 1), False)]
