"""A node's side of training, in-process: `backward` gives the gradients autograd gives over the same layers,
adapters apply to their own session's rows only (batched or not), and bad or refused requests get typed errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from swarm.errors import ProtocolError
from swarm.models.adapters import LayerAdapters, LowRank, RowAdapter, target_shape
from swarm.models.attention import StatelessAttention
from swarm.node.sessions import SessionTable
from swarm.node.span import LoadedSpan
from swarm.node.steps import PendingStep, run_alone, run_batched
from swarm.node.validation import StepInputs, decode_adapter
from swarm.protocol import AdapterPair, Backward, WireAdapter, WireTensor
from tests.node.session_helpers import open_session
from tests.node.test_server import HIDDEN, ask, client, forwarding, opening, run

RANK = 3


@pytest.fixture(scope="module")
def span(tiny_llama: Path) -> LoadedSpan:
    return LoadedSpan.load(tiny_llama, 2, 6, torch.device("cpu"), torch.float32, show_progress=False)


def random_adapter(span: LoadedSpan, layers: range, seed: int = 0) -> LayerAdapters:
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in layers:
        for target in ("qkv", "out"):
            features_in, features_out = target_shape(span.architecture.spec, target)
            a = torch.randn(RANK, features_in, generator=generator) * 0.1
            b = torch.randn(features_out, RANK, generator=generator) * 0.1
            pairs[(layer, target)] = LowRank(a, b)
    return LayerAdapters(2.0 / RANK, pairs)


def wire(adapter: LayerAdapters) -> WireAdapter:
    return WireAdapter(
        rank=RANK,
        alpha=adapter.scale * RANK,
        pairs=[
            AdapterPair(layer=layer, target=target, a=WireTensor.from_torch(pair.a), b=WireTensor.from_torch(pair.b))
            for (layer, target), pair in adapter.pairs.items()
        ],
    )


def plain_autograd(
    span: LoadedSpan, hidden: torch.Tensor, positions: torch.Tensor, real: torch.Tensor, adapter: LayerAdapters | None
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The span's output and gradients by plain autograd (no recomputation) for the loss sum(output * weights)."""
    leaves = [t.clone().requires_grad_(True) for t in adapter.tensors()] if adapter else []
    rows = None
    if adapter is not None:
        tensors = iter(leaves)
        pairs = {key: LowRank(next(tensors), next(tensors)) for key in adapter.pairs}
        rows = [RowAdapter(0, hidden.shape[0], LayerAdapters(adapter.scale, pairs))]
    inputs = hidden.clone().requires_grad_(True)
    attention = StatelessAttention(span.architecture.spec, real, positions, torch.float32)
    with torch.enable_grad():
        output = span.stack(inputs, positions, attention, span.start, span.end, rows)
        weights = torch.linspace(-1, 1, output.numel()).view_as(output)
        grads = torch.autograd.grad((output * weights).sum(), [inputs, *leaves])
    return grads[0], list(grads[1:]), weights


@pytest.mark.parametrize("with_adapter", [False, True])
def test_backward_equals_plain_autograd_over_the_span(span: LoadedSpan, with_adapter: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN)
    real = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    adapter = random_adapter(span, range(3, 5)) if with_adapter else None
    expected_hidden, expected_adapter, weights = plain_autograd(span, hidden, positions, real, adapter)

    grad_hidden, grad_adapter = span.backward(hidden, positions, real, weights, span.start, span.end, adapter)

    torch.testing.assert_close(grad_hidden, expected_hidden, atol=1e-6, rtol=1e-5)
    assert len(grad_adapter) == len(expected_adapter) == (8 if with_adapter else 0)
    for got, expected in zip(grad_adapter, expected_adapter, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_an_adapters_pairs_act_only_on_their_own_layers(span: LoadedSpan) -> None:
    """An adapter whose B is zero changes nothing; one on a layer outside the computed range changes nothing."""
    hidden, positions = torch.randn(1, 4, HIDDEN), torch.arange(4)[None]
    real = torch.ones(1, 4, dtype=torch.bool)
    base = span.forward_stateless(hidden, positions, real, 2, 4)
    outside = random_adapter(span, range(4, 6))
    assert torch.equal(span.forward_stateless(hidden, positions, real, 2, 4, outside), base)
    inside = random_adapter(span, range(2, 4))
    assert not torch.allclose(span.forward_stateless(hidden, positions, real, 2, 4, inside), base)


def test_batched_sessions_with_and_without_an_adapter_each_equal_running_alone(span: LoadedSpan) -> None:
    """Two sessions, one adapted: a batched decode step gives each what its own step alone gives."""
    adapter = random_adapter(span, range(2, 6), seed=1)

    def prefilled() -> tuple[SessionTable, list]:
        torch.manual_seed(3)
        table = SessionTable(10_000, 8)
        sessions = [open_session(span, table, name, 1) for name in ("plain", "adapted")]
        sessions[1].adapter = adapter
        for session in sessions:
            prompt = StepInputs(torch.randn(1, 5, HIDDEN), torch.arange(5)[None], None, None)
            run_alone(span, session, prompt)
        return table, sessions

    step = [StepInputs(torch.randn(1, 1, HIDDEN), torch.tensor([[5]]), None, None) for _ in range(2)]
    _, alone = prefilled()
    expected = [run_alone(span, session, inputs) for session, inputs in zip(alone, step, strict=True)]

    async def batched() -> list[torch.Tensor]:
        _, sessions = prefilled()
        pending = [PendingStep(session, inputs) for session, inputs in zip(sessions, step, strict=True)]
        return run_batched(span, pending)

    together = asyncio.run(batched())
    for got, want in zip(together, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1])


def test_bad_adapters_are_refused_with_the_reason(span: LoadedSpan) -> None:
    spec = span.architecture.spec
    good = wire(random_adapter(span, range(2, 4)))
    assert decode_adapter(good, spec, 2, 4, 2**20) is not None
    cases = {
        "outside the requested layers": (good, 3, 4, 2**20),
        "exceeds this node's limit": (good, 2, 4, 100),
    }
    first = good.pairs[0]
    wrong_shape = first.model_copy(update={"a": WireTensor.from_torch(torch.zeros(RANK, HIDDEN + 1))})
    cases["must be floating of shape"] = (good.model_copy(update={"pairs": [wrong_shape]}), 2, 4, 2**20)
    nan = torch.zeros(RANK, HIDDEN)
    nan[0, 0] = float("nan")
    not_finite = first.model_copy(update={"a": WireTensor.from_torch(nan)})
    cases["NaN or infinite"] = (good.model_copy(update={"pairs": [not_finite]}), 2, 4, 2**20)
    for reason, (adapter, start, end, limit) in cases.items():
        with pytest.raises(ProtocolError, match=reason) as caught:
            decode_adapter(adapter, spec, start, end, limit)
        assert caught.value.code == "bad_request"


def backward_message(batch: int = 1, tokens: int = 4, grad_shape: tuple[int, ...] | None = None) -> Backward:
    forward = forwarding(batch, tokens)
    return Backward(
        start=0,
        end=8,
        hidden=forward.hidden,
        position_ids=forward.position_ids,
        grad_output=WireTensor.from_torch(torch.randn(*(grad_shape or (batch, tokens, HIDDEN)))),
    )


def test_a_node_answers_backward_and_refuses_bad_ones_without_harm(tiny_llama: Path) -> None:
    async def scenario(node, address: str) -> None:
        async with client(address) as connection:
            assert (await ask(connection, opening("kept"))).type == "session_opened"
            answer = await ask(connection, backward_message())
            assert answer.type == "backward_result" and answer.grad_hidden.shape == [1, 4, HIDDEN]
            assert torch.isfinite(answer.grad_hidden.to_torch()).all()
            wrong = await ask(connection, backward_message(grad_shape=(1, 3, HIDDEN)))
            assert wrong.type == "error" and wrong.code == "bad_request" and "grad_output" in wrong.message
            too_long = await ask(connection, backward_message(batch=2, tokens=40))
            assert too_long.type == "error" and too_long.code == "bad_request" and "64 tokens" in too_long.message
            outside = backward_message().model_copy(update={"end": 9})
            refused = await ask(connection, outside)
            assert refused.type == "error" and refused.code == "bad_request"
            still = await ask(connection, forwarding(1, 3))  # the node and the session are untouched
            assert still.type == "forward_result"
            assert len(node.sessions) == 1  # the session opened first is still open

    run(tiny_llama, scenario, max_training_tokens=64)


def test_a_node_started_with_no_training_refuses_backward_and_says_so(tiny_llama: Path) -> None:
    async def scenario(node, address: str) -> None:
        assert node.peer_info().training is False
        async with client(address) as connection:
            refused = await ask(connection, backward_message())
            assert refused.type == "error" and refused.code == "not_offered" and "--no-training" in refused.message
            assert (await ask(connection, forwarding(1, 3))).type == "forward_result"

    run(tiny_llama, scenario, training=False)
