"""Long steps run in chunks: same hidden states, other sessions' steps in between, exact undo on failure."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from swarm.node import steps as node_steps
from swarm.node.chunking import SessionCheckpoint, split_step
from swarm.node.metrics import NodeMetrics
from swarm.node.sessions import Session, SessionTable
from swarm.node.span import LoadedSpan
from swarm.node.steps import StepScheduler, run_alone
from swarm.node.validation import StepInputs
from tests.checkpoints import build_tiny
from tests.node.session_helpers import open_session, real_tokens, rows_of, stored

PROMPT_TOKENS = 11
# float32: chunks change matmul shapes, and with them the order a CPU's kernels add in; on an AMD EPYC a
# Mistral-family chunk differed by 1.3e-5 at a value of 0.38. A misplaced mask or position is off by 0.1 or more.
TOLERANCE = dict(atol=5e-5, rtol=1.3e-6)


def batcher(span: LoadedSpan, chunk_tokens: int) -> StepScheduler:
    metrics = NodeMetrics(SessionTable(1, 1), lambda: "online")
    return StepScheduler(lambda: span, metrics, chunk_tokens=chunk_tokens)


async def submitted(scheduler: StepScheduler, session: Session, inputs: StepInputs) -> torch.Tensor:
    return await scheduler.submit(session, inputs)


def watch_runs(monkeypatch: pytest.MonkeyPatch, before: Callable[[Session, bool], None]) -> None:
    """Call `before(session, is_chunk)` ahead of every step or chunk the scheduler runs alone."""
    real = node_steps.run_alone

    def watched(span, session, inputs, checkpoint=None):  # type: ignore[no-untyped-def]
        before(session, checkpoint is not None)
        return real(span, session, inputs, checkpoint)

    monkeypatch.setattr(node_steps, "run_alone", watched)


def prompt(hidden_size: int, generator: torch.Generator, padding: tuple[int, ...] = (0, 3)) -> StepInputs:
    """A left-padded batch, one row per entry of `padding`, positions counted from each row's first real token."""
    mask = torch.ones(len(padding), PROMPT_TOKENS, dtype=torch.bool)
    for row, pad in enumerate(padding):
        mask[row, :pad] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return StepInputs(torch.randn(len(padding), PROMPT_TOKENS, hidden_size, generator=generator), positions, mask, None)


def first_step(hidden: torch.Tensor) -> StepInputs:
    batch, tokens = hidden.shape[:2]
    return StepInputs(
        hidden, torch.arange(tokens).expand(batch, tokens), torch.ones(batch, tokens, dtype=torch.bool), None
    )


def following(session: Session, hidden: torch.Tensor, hypo_ids: torch.Tensor | None = None) -> StepInputs:
    """The next step on `session` (after the reorder `hypo_ids`, if any): positions go on, every new token is real."""
    batch, tokens = hidden.shape[:2]
    last = session.last_positions if hypo_ids is None else session.last_positions[hypo_ids]  # type: ignore[index]
    positions = last[:, None] + 1 + torch.arange(tokens)
    return StepInputs(hidden, positions, torch.ones(batch, tokens, dtype=torch.bool), hypo_ids)


def run_steps(span: LoadedSpan, session: Session, chunk_tokens: int, extra: list[torch.Tensor]) -> list[torch.Tensor]:
    """A left-padded prompt, then each of `extra` as a following step, all through one batcher."""

    steps = batcher(span, chunk_tokens)  # held here, so its worker outlives `main` until asyncio.run cancels it

    async def main() -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(7)
        outputs = [await steps.submit(session, prompt(span.hidden_size, generator))]
        for hidden in extra:
            outputs.append(await steps.submit(session, following(session, hidden)))
        return outputs

    return asyncio.run(main())


# Padding tokens attend to nothing, so what the layers make of them is arbitrary (and differs with the
# chunking); no real token ever reads them. Comparisons below are over real tokens.


def assert_same_outputs(whole: list[torch.Tensor], chunked: list[torch.Tensor], mask: torch.Tensor) -> None:
    """Each step's output agrees at its real tokens; `mask` is the session's mask over all the steps."""
    for one, many, real in zip(whole, chunked, mask.split([o.shape[1] for o in whole], dim=1), strict=True):
        assert many.shape == one.shape
        torch.testing.assert_close(many[real], one[real], **TOLERANCE)


def assert_same_session(a: Session, b: Session) -> None:
    assert a.length == b.length
    assert torch.equal(real_tokens(a), real_tokens(b)) and torch.equal(a.last_positions, b.last_positions)
    real = real_tokens(a)
    for tensor_a, tensor_b in zip(stored(a), stored(b), strict=True):  # [layers, batch, heads, length, dim]
        assert tensor_a.shape == tensor_b.shape
        torch.testing.assert_close(
            tensor_b.permute(1, 3, 0, 2, 4)[real], tensor_a.permute(1, 3, 0, 2, 4)[real], **TOLERANCE
        )


@pytest.fixture(scope="module")
def span(tiny_llama: Path) -> LoadedSpan:
    return LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)


def test_split_step_slices_positions_and_mask_and_reorders_with_the_first_chunk_only() -> None:
    hidden = torch.arange(2 * 7 * 1.0).reshape(2, 7, 1)
    positions = torch.arange(7).expand(2, 7)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool)
    chunks = split_step(StepInputs(hidden, positions, mask, torch.tensor([1, 0])), 3)
    assert [c.hidden.shape[1] for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([c.hidden for c in chunks], dim=1), hidden)
    assert torch.equal(torch.cat([c.position_ids for c in chunks], dim=1), positions)
    assert torch.equal(torch.cat([c.attention_mask for c in chunks], dim=1), mask)
    assert chunks[0].hypo_ids.tolist() == [1, 0] and chunks[1].hypo_ids is None and chunks[2].hypo_ids is None


@pytest.mark.parametrize("chunk_tokens", [1, 3, 4, 10])
def test_chunked_prefill_equals_unchunked_with_left_padding(span: LoadedSpan, chunk_tokens: int) -> None:
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    generator = torch.Generator().manual_seed(0)
    # after the prompt: a decode step, then a longer step that is chunked on top of a filled cache
    extra = [torch.randn(2, tokens, 64, generator=generator) for tokens in (1, 7)]
    whole_session, chunked_session = open_session(span, table, "whole", 2), open_session(span, table, "chunked", 2)
    whole = run_steps(span, whole_session, 0, extra)
    chunked = run_steps(span, chunked_session, chunk_tokens, extra)
    assert_same_outputs(whole, chunked, real_tokens(whole_session))
    assert_same_session(whole_session, chunked_session)


@pytest.mark.parametrize("family", ["bloom", "falcon-alibi", "gpt_neox", "mistral"])
def test_chunked_prefill_equals_unchunked_in_other_families(family: str, tmp_path: Path) -> None:
    checkpoint = build_tiny(family, tmp_path / family, sharded=False)
    family_span = LoadedSpan.load(checkpoint, 1, 3, torch.device("cpu"), torch.float32, show_progress=False)
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    extra = [torch.randn(2, 5, family_span.hidden_size, generator=torch.Generator().manual_seed(1))]
    whole_session, chunked_session = (open_session(family_span, table, name, 2) for name in ("whole", "chunked"))
    whole = run_steps(family_span, whole_session, 0, extra)
    chunked = run_steps(family_span, chunked_session, 3, extra)
    assert_same_outputs(whole, chunked, real_tokens(whole_session))
    assert_same_session(whole_session, chunked_session)


def test_another_sessions_decode_step_runs_between_prefill_chunks(
    span: LoadedSpan, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    generator = torch.Generator().manual_seed(2)
    long_prompt, short = open_session(span, table, "long", 2), open_session(span, table, "short", 1)
    run_alone(span, short, first_step(torch.randn(1, 4, 64, generator=generator)))
    computed: list[str] = []
    finished: list[str] = []
    decode: list[asyncio.Future[torch.Tensor]] = []

    def recording(session: Session, chunk: bool) -> None:
        computed.append(session.session_id)
        if not decode:  # the prompt's first chunk is computing: a decode step of another session arrives
            decode.append(steps.submit(short, following(short, torch.randn(1, 1, 64))))
            decode[0].add_done_callback(lambda _: finished.append("short"))

    watch_runs(monkeypatch, recording)
    steps = batcher(span, 3)

    async def main() -> None:
        await steps.submit(long_prompt, prompt(64, generator))
        finished.append("long")
        await decode[0]

    asyncio.run(main())
    assert computed == ["long", "short", "long", "long", "long"]  # 11 tokens in chunks of 3, the decode after one
    assert finished == ["short", "long"]


def test_steps_of_one_session_run_in_order_even_when_submitted_together(span: LoadedSpan) -> None:
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    generator = torch.Generator().manual_seed(3)
    first, second = torch.randn(1, 8, 64, generator=generator), torch.randn(1, 1, 64, generator=generator)
    alone = open_session(span, table, "alone", 1)
    expected = [run_alone(span, alone, first_step(first))]
    expected.append(run_alone(span, alone, following(alone, second)))
    together = open_session(span, table, "together", 1)
    second_step = StepInputs(second, torch.tensor([[8]]), torch.ones(1, 1, dtype=torch.bool), None)

    steps = batcher(span, 3)

    async def main() -> list[torch.Tensor]:
        return list(
            await asyncio.gather(steps.submit(together, first_step(first)), steps.submit(together, second_step))
        )

    for got, want in zip(asyncio.run(main()), expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)
    assert_same_session(alone, together)


@pytest.mark.parametrize("reorder", [None, torch.tensor([1, 0])], ids=["append", "beam-reorder"])
def test_a_failure_in_a_middle_chunk_leaves_the_session_as_before_the_step(
    span: LoadedSpan, monkeypatch: pytest.MonkeyPatch, reorder: torch.Tensor | None
) -> None:
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    generator = torch.Generator().manual_seed(4)
    victim, bystander, reference = (open_session(span, table, name, 2) for name in ("victim", "bystander", "ref"))
    start = prompt(64, generator)
    for session in (victim, bystander, reference):
        run_alone(span, session, start)
    length, mask, last_positions = victim.length, real_tokens(victim).clone(), victim.last_positions
    long_step = torch.randn(2, 9, 64, generator=generator)  # a beam reorder rides on its first chunk
    layer = span.stack.layers[1]
    real_forward = layer.forward
    fail_now = False
    victim_chunks = 0

    def second_layer(*args: object, **kwargs: object) -> object:
        if fail_now:  # the first layer of the span has already written this chunk to the cache
            raise RuntimeError("device fell over")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", second_layer)

    def before(session: Session, chunk: bool) -> None:
        nonlocal fail_now, victim_chunks
        victim_chunks += session is victim and chunk
        fail_now = session is victim and victim_chunks == 2

    watch_runs(monkeypatch, before)
    steps = batcher(span, 3)

    async def main() -> tuple[BaseException | torch.Tensor, ...]:
        return tuple(
            await asyncio.gather(
                steps.submit(victim, following(victim, long_step, reorder)),
                steps.submit(bystander, following(bystander, torch.randn(2, 1, 64, generator=generator))),
                return_exceptions=True,
            )
        )

    failed, passed = asyncio.run(main())
    assert isinstance(failed, RuntimeError) and isinstance(passed, torch.Tensor)
    assert victim.length == length == PROMPT_TOKENS
    assert torch.equal(real_tokens(victim), mask) and torch.equal(victim.last_positions, last_positions)
    for kept, expected in zip(stored(victim), stored(reference), strict=True):
        assert torch.equal(kept, expected)
    monkeypatch.undo()
    fail_now = False
    again = batcher(span, 3)
    retried = asyncio.run(submitted(again, victim, following(victim, long_step, reorder)))
    expected = run_alone(span, reference, following(reference, long_step, reorder))
    torch.testing.assert_close(retried, expected, **TOLERANCE)
    assert_same_session(reference, victim)


def test_a_checkpoint_copies_the_session_rows_only_for_a_step_that_reorders_them(span: LoadedSpan) -> None:
    """Appending needs only the length back (later slots are never read); a beam reorder moves rows."""
    session = open_session(span, SessionTable(cache_tokens=10_000, max_sessions=8), "s", 2)
    run_alone(span, session, prompt(64, torch.Generator().manual_seed(5)))
    appending = SessionCheckpoint.of(session, reorders=False)
    assert appending.rows is None and appending.length == PROMPT_TOKENS
    reordering = SessionCheckpoint.of(session, reorders=True)
    rows = rows_of(session)
    assert reordering.rows is not None
    assert torch.equal(reordering.rows[0], rows.slab.keys[:, rows.rows])
    assert reordering.rows[0].data_ptr() != rows.slab.keys.data_ptr()


def test_a_long_step_whose_request_is_cancelled_stops_between_chunks_and_is_undone(
    span: LoadedSpan, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = SessionTable(cache_tokens=10_000, max_sessions=8)
    session, fresh = open_session(span, table, "gone", 2), open_session(span, table, "fresh", 2)
    computed: list[bool] = []
    requests: list[asyncio.Future[torch.Tensor]] = []

    def before(running: Session, chunk: bool) -> None:
        computed.append(chunk)
        if len(computed) == 2:  # the client went away while the first chunk computed
            requests[0].cancel()

    steps = batcher(span, 3)
    after = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(6))

    async def main() -> torch.Tensor:
        watch_runs(monkeypatch, before)
        requests.append(steps.submit(session, prompt(64, torch.Generator().manual_seed(6))))
        requests[0].add_done_callback(lambda _: None)
        await asyncio.sleep(0)  # the first chunk runs
        requests[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await requests[0]
        return await steps.submit(session, first_step(after))

    output = asyncio.run(main())
    monkeypatch.undo()
    assert computed == [True, False]  # the prompt's other three chunks never ran
    torch.testing.assert_close(output, run_alone(span, fresh, first_step(after)), **TOLERANCE)
    assert_same_session(fresh, session)
