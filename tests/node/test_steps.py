"""The node's step rounds: batched decode steps give each session exactly what it gets alone, steps that wait
together run together, a session's steps run in order, an ended session's step never runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from swarm.errors import ProtocolError
from swarm.node import steps
from swarm.node.kv_cache import capacity_for
from swarm.node.metrics import NodeMetrics
from swarm.node.sessions import Session, SessionTable
from swarm.node.span import LoadedSpan
from swarm.node.steps import PendingStep, StepScheduler, run_alone, run_batched
from swarm.node.validation import StepInputs
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

    batched = run_batched(span, asyncio.run(pending()))
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


def scheduler(span: LoadedSpan, table: SessionTable, **options: object) -> StepScheduler:
    return StepScheduler(lambda: span, NodeMetrics(table, lambda: "online"), **options)  # type: ignore[arg-type]


def test_steps_that_wait_together_run_as_one_round_and_a_lone_step_alone(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps submitted before the scheduler gets its turn (one frame's sessions, or frames that arrived during
    the previous round) make up one round: single-token steps over the same layers run as one forward."""
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    sessions = prefilled(span, table, "s", [torch.randn(1, 4, 64) for _ in range(3)])
    rounds: list[int] = []
    real = steps.run_batched
    monkeypatch.setattr(steps, "run_batched", lambda span, batch: rounds.append(len(batch)) or real(span, batch))

    async def scenario() -> None:
        scheduling = scheduler(span, table)

        def decode(session: Session) -> asyncio.Future[torch.Tensor]:
            return scheduling.submit(session, step_inputs(torch.randn(1, 1, 64), session.length))

        await decode(sessions[0])  # alone: nothing to batch with
        await asyncio.gather(*(decode(session) for session in sessions))  # together: one round
        metrics = scheduling._metrics
        assert metrics.batched_steps._value.get() == 3  # type: ignore[attr-defined]

    asyncio.run(scenario())
    assert rounds == [3]


def test_steps_of_a_session_sent_back_to_back_run_one_per_round_in_order(tiny_llama: Path) -> None:
    """A client may send a session's next step before the reply to the previous one arrives (pipelining): the
    second waits for the first, in the next round, and sees its tokens."""
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    generator = torch.Generator().manual_seed(3)
    prompt, first, second = (torch.randn(1, n, 64, generator=generator) for n in (5, 1, 1))
    alone, pipelined = prefilled(span, table, "a", [prompt]) + prefilled(span, table, "p", [prompt])
    expected = [run_alone(span, alone, step_inputs(hidden, 5 + i)) for i, hidden in enumerate((first, second))]

    async def scenario() -> list[torch.Tensor]:
        scheduling = scheduler(span, table)
        both = [scheduling.submit(pipelined, step_inputs(hidden, 5 + i)) for i, hidden in enumerate((first, second))]
        return list(await asyncio.gather(*both))

    for got, want in zip(asyncio.run(scenario()), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert pipelined.length == alone.length == 7


def test_a_step_of_a_session_that_ended_before_it_ran_fails_and_touches_no_cache(tiny_llama: Path) -> None:
    """Its rows may already be another session's: the step must not run."""
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    (session,) = prefilled(span, table, "s", [torch.randn(1, 4, 64)])

    async def scenario() -> None:
        waiting = scheduler(span, table).submit(session, step_inputs(torch.randn(1, 1, 64), 4))
        table.close(session.session_id)
        with pytest.raises(ProtocolError) as failure:
            await waiting
        assert failure.value.code == "unknown_session"

    asyncio.run(scenario())
    assert session.length == 4


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
