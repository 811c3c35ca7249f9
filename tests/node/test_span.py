"""A node's span: loaded from its own tensors only, and computing what the full model computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import swarm.checkpoint
from swarm.checkpoint import CheckpointIndex
from swarm.node.span import LoadedSpan


def test_a_span_reads_only_its_own_layers_tensors(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    read: list[str] = []
    real_safe_open = swarm.checkpoint.safe_open

    class SpyingHandle:
        def __init__(self, path: str, **kwargs: object) -> None:
            opened.append(Path(path).name)
            self.inner = real_safe_open(path, **kwargs)

        def __enter__(self) -> SpyingHandle:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.inner.get_tensor(name)

        def get_slice(self, name: str):
            return self.inner.get_slice(name)

        def keys(self):
            return self.inner.keys()

    index = CheckpointIndex.open(tiny_llama)
    assert len(set(index.shard_of.values())) > 3, "the fixture must be sharded for this test to mean anything"
    monkeypatch.setattr(swarm.checkpoint, "safe_open", SpyingHandle)

    span = LoadedSpan.load(tiny_llama, 2, 4, torch.device("cpu"), torch.float32, show_progress=False)

    assert read and all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in read)
    assert sorted(read) == sorted(
        index.names_with_prefix("model.layers.2.") + index.names_with_prefix("model.layers.3.")
    )
    needed_shards = {index.shard_of[name] for name in read}
    assert set(opened) == needed_shards
    assert len(needed_shards) < len(set(index.shard_of.values()))
    total_layer_bytes = sum(p.numel() * 4 for p in span.stack.parameters())
    assert span.bytes_loaded == total_layer_bytes


def test_chained_spans_equal_the_full_model_with_left_padding(tiny_llama: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    first = LoadedSpan.load(tiny_llama, 0, 3, torch.device("cpu"), torch.float32, show_progress=False)
    second = LoadedSpan.load(tiny_llama, 3, 8, torch.device("cpu"), torch.float32, show_progress=False)
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        hidden = reference.model.embed_tokens(ids)
        hidden = first.forward_stateless(hidden, positions, mask.bool(), 0, 3)
        torch.testing.assert_close(hidden[1], expected.hidden_states[3][1], atol=1e-5, rtol=0)
        hidden = second.forward_stateless(hidden, positions, mask.bool(), 3, 8)
        logits = reference.lm_head(reference.model.norm(hidden))
    torch.testing.assert_close(logits[:, -1], expected.logits[:, -1], atol=1e-5, rtol=0)


def test_a_sub_range_of_the_span_runs_alone(tiny_llama: Path) -> None:
    span = LoadedSpan.load(tiny_llama, 0, 8, torch.device("cpu"), torch.float32, show_progress=False)
    hidden = torch.randn(1, 4, 64)
    positions = torch.arange(4)[None]
    mask = torch.ones(1, 4, dtype=torch.bool)
    whole = span.forward_stateless(hidden, positions, mask, 0, 8)
    parts = span.forward_stateless(span.forward_stateless(hidden, positions, mask, 0, 5), positions, mask, 5, 8)
    torch.testing.assert_close(whole, parts, atol=1e-6, rtol=0)


def test_compiled_layers_compute_what_plain_ones_do(tiny_llama: Path) -> None:
    """`swarm-node --compile`: the same prefill and decode rounds through torch.compile'd layers."""
    from swarm.node.sessions import SessionTable
    from swarm.node.steps import run_alone
    from swarm.node.validation import StepInputs
    from tests.node.session_helpers import open_session

    outputs = []
    for compiled in (False, True):  # one layer: compiling is slow on two CPU cores
        span = LoadedSpan.load(tiny_llama, 3, 4, torch.device("cpu"), torch.float32, show_progress=False)
        if compiled:
            span.stack.compile()
        session = open_session(span, SessionTable(10_000, 4), "s", 1)
        generator = torch.Generator().manual_seed(0)
        steps = [torch.randn(1, 5, 64, generator=generator)] + [torch.randn(1, 1, 64, generator=generator)] * 3
        got, position = [], 0
        for hidden in steps:
            tokens = hidden.shape[1]
            positions = torch.arange(position, position + tokens)[None]
            got.append(run_alone(span, session, StepInputs(hidden, positions, torch.ones(1, tokens).bool(), None)))
            position += tokens
        outputs.append(got)
    for plain, compiled_output in zip(*outputs, strict=True):
        torch.testing.assert_close(compiled_output, plain, atol=1e-5, rtol=1e-5)
