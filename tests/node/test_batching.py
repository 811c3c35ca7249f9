"""Batched decode steps give each session exactly what it gets alone."""

from __future__ import annotations

from pathlib import Path

import torch

from node.batching import PendingStep, can_batch, run_alone, run_batched
from node.sessions import SessionTable
from node.span import LoadedSpan
from node.validation import StepInputs


def step_inputs(hidden: torch.Tensor, start: int) -> StepInputs:
    batch, tokens = hidden.shape[:2]
    positions = torch.arange(start, start + tokens).expand(batch, tokens)
    return StepInputs(hidden, positions, torch.ones(batch, tokens, dtype=torch.bool), None)


def test_batched_decode_equals_each_session_alone(tiny_llama: Path) -> None:
    span = LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    generator = torch.Generator().manual_seed(0)
    prefills = [torch.randn(b, n, 64, generator=generator) for b, n in ((1, 3), (2, 11), (1, 7))]
    decodes = [torch.randn(p.shape[0], 1, 64, generator=generator) for p in prefills]

    def fresh_sessions(tag: str) -> list:
        sessions = [
            table.open(f"{tag}{i}", 1, (2, 6), 64, p.shape[0], 0.0, span.new_cache) for i, p in enumerate(prefills)
        ]
        for session, prefill in zip(sessions, prefills, strict=True):
            run_alone(span, session, step_inputs(prefill, 0))
        return sessions

    alone_sessions, batched_sessions = fresh_sessions("a"), fresh_sessions("b")
    alone = [run_alone(span, s, step_inputs(d, s.length)) for s, d in zip(alone_sessions, decodes, strict=True)]

    async def pending() -> list[PendingStep]:
        return [PendingStep(s, step_inputs(d, s.length)) for s, d in zip(batched_sessions, decodes, strict=True)]

    import asyncio

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
