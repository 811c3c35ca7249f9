"""Batched decode steps give each session exactly what it gets alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from node import batching
from node.batching import PendingStep, StepBatcher, can_batch, run_alone, run_batched
from node.kv_cache import capacity_for
from node.sessions import Session, SessionTable
from node.span import LoadedSpan
from node.validation import StepInputs
from tests.node.session_helpers import rows_of, stored


def step_inputs(hidden: torch.Tensor, start: int) -> StepInputs:
    batch, tokens = hidden.shape[:2]
    positions = torch.arange(start, start + tokens).expand(batch, tokens)
    return StepInputs(hidden, positions, torch.ones(batch, tokens, dtype=torch.bool), None)


def prefilled(
    span: LoadedSpan, table: SessionTable, tag: str, prompts: list[torch.Tensor], max_length: int = 64
) -> list[Session]:
    """One session over layers 2-5 per prompt (hidden states [batch, tokens, 64]), each prefilled alone."""
    sessions = [
        table.open(f"{tag}{i}", 1, (2, 6), max_length, p.shape[0], 0.0, capacity_for, span.cache.allocate)
        for i, p in enumerate(prompts)
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
        assert a.length == b.length
        torch.testing.assert_close(stored(b)[0], stored(a)[0], atol=1e-5, rtol=0)
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


def test_sessions_of_any_lengths_batch_where_their_caches_lie_and_stay_exact(tiny_llama: Path) -> None:
    """Rounds over sessions of very different lengths (3 to 40 tokens), some stepping and some not, with holes
    between their rows: every output equals the session stepped alone, and no cache is copied or reallocated
    along the way (the slab tensors stay the same objects)."""
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=100_000, max_sessions=32)
    generator = torch.Generator().manual_seed(1)
    shapes = ((1, 3), (2, 5), (1, 4), (1, 40))
    prefills = [torch.randn(b, n, 64, generator=generator) for b, n in shapes]
    alone, batched = prefilled(span, table, "a", prefills), prefilled(span, table, "b", prefills)
    slab = rows_of(batched[0]).slab
    keys, values = slab.keys, slab.values

    async def pending(chosen: list[int], hidden: list[torch.Tensor]) -> list[PendingStep]:
        return [PendingStep(batched[i], step_inputs(h, batched[i].length)) for i, h in zip(chosen, hidden, strict=True)]

    def round_(chosen: list[int]) -> None:
        hidden = [torch.randn(prefills[i].shape[0], 1, 64, generator=generator) for i in chosen]
        expected = [
            run_alone(span, alone[i], step_inputs(h, alone[i].length)) for i, h in zip(chosen, hidden, strict=True)
        ]
        got = run_batched(span, asyncio.run(pending(chosen, hidden)))
        for one, many in zip(expected, got, strict=True):
            torch.testing.assert_close(many, one, atol=1e-5, rtol=0)

    for chosen in ([0, 1, 2, 3], [0, 1, 2, 3], [2, 0], [3, 1], [0, 1, 2, 3]):
        round_(chosen)
    assert slab.keys is keys and slab.values is values
    for a, b in zip(alone, batched, strict=True):
        assert a.length == b.length
        torch.testing.assert_close(stored(b)[0], stored(a)[0], atol=1e-5, rtol=0)


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
