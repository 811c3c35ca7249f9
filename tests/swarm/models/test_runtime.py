"""Every family on swarm's own runtime: two node spans and the client's local modules compute what local
`transformers` does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput

from swarm.client.core.model import position_ids_from_mask
from swarm.errors import UnsupportedModelError
from swarm.models import ModelArchitecture
from swarm.models.packed import pack_linears, packing_available
from swarm.models.spec import ConfigReader
from swarm.node.sessions import Session
from swarm.node.steps import PendingStep, run_alone, run_batched
from swarm.node.validation import StepInputs
from tests.checkpoints import TINY_CONFIGS, build_tiny
from tests.swarm.models.pipeline import Pipeline, open_session

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7]])
SHORT, LONG = [1, 500, 400, 300], [1, 45, 67, 89, 120, 33, 250, 7, 99, 14]
NEW_TOKENS = 10


def left_padded(*prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def local_generate(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> GenerateDecoderOnlyOutput:
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sharded into several files, except GPT-2, which keeps the single-file layout."""
    family = request.param
    return build_tiny(family, tmp_path_factory.mktemp("checkpoints") / family, sharded=family != "gpt2")


@pytest.fixture(scope="module")
def local(checkpoint: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pipeline(checkpoint: Path) -> Pipeline:
    return Pipeline.load(checkpoint, split=2)


def test_greedy_through_two_spans_equals_local_generate(pipeline: Pipeline, local: PreTrainedModel) -> None:
    mask = torch.ones_like(PROMPT)
    remote = pipeline.greedy(PROMPT, mask, NEW_TOKENS)
    expected = local_generate(local, PROMPT, mask)
    assert remote.tokens.tolist() == expected.sequences.tolist()
    for remote_logits, local_logits in zip(remote.logits, expected.logits, strict=True):
        torch.testing.assert_close(remote_logits, local_logits, atol=1e-4, rtol=0)


def test_left_padded_batch_equals_local_generate_and_each_prompt_alone(
    pipeline: Pipeline, local: PreTrainedModel
) -> None:
    ids, mask = left_padded(SHORT, LONG)
    together = pipeline.greedy(ids, mask, NEW_TOKENS)
    expected = local_generate(local, ids, mask)
    assert together.tokens.tolist() == expected.sequences.tolist()
    for remote_logits, local_logits in zip(together.logits, expected.logits, strict=True):
        torch.testing.assert_close(remote_logits, local_logits, atol=1e-4, rtol=0)
    for row, prompt in enumerate((SHORT, LONG)):
        alone = pipeline.greedy(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), NEW_TOKENS)
        assert together.tokens[row, ids.shape[1] :].tolist() == alone.tokens[0, len(prompt) :].tolist()


@pytest.mark.skipif(not packing_available(), reason="oneDNN is not available in this torch build")
def test_packed_linears_keep_greedy_output_and_logits_equal_to_local_generate(
    checkpoint: Path, local: PreTrainedModel
) -> None:
    """Large float32 weights on a CPU run through oneDNN (`swarm.models.packed`); these are small, so every
    linear layer is packed here, on the nodes and the client."""
    pipeline = Pipeline.load(checkpoint, split=2)
    modules = [*(span.stack for span in pipeline.spans), pipeline.local]
    assert sum(pack_linears(module, min_elements=0) for module in modules) > 0
    for ids, mask in ((PROMPT, torch.ones_like(PROMPT)), left_padded(SHORT, LONG)):
        remote = pipeline.greedy(ids, mask, NEW_TOKENS)
        expected = local_generate(local, ids, mask)
        assert remote.tokens.tolist() == expected.sequences.tolist()
        for remote_logits, local_logits in zip(remote.logits, expected.logits, strict=True):
            torch.testing.assert_close(remote_logits, local_logits, atol=1e-4, rtol=0)


BF16_STEPS = 3
"""bfloat16 logits agree within this many bfloat16 steps (2^-7 each) at the logits' scale. Most families are
bit-identical to transformers; GPT-J (its sinusoid table computed in bfloat16), GPT-2 (Conv1D's addmm), BLOOM
(ALiBi through baddbmm) and multi-query Falcon (broadcast keys) round differently: measured worst 1.7 steps."""


def test_bfloat16_spans_compute_what_a_local_bfloat16_model_does(checkpoint: Path) -> None:
    pipeline = Pipeline.load(checkpoint, split=2, dtype=torch.bfloat16)
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    mask = torch.ones_like(PROMPT)
    remote = pipeline.greedy(PROMPT, mask, NEW_TOKENS)
    expected = local_generate(local, PROMPT, mask)
    assert remote.tokens.tolist() == expected.sequences.tolist()
    for remote_logits, local_logits in zip(remote.logits, expected.logits, strict=True):
        scale = float(local_logits.float().abs().max())
        tolerance = BF16_STEPS * torch.finfo(torch.bfloat16).eps * scale
        torch.testing.assert_close(remote_logits, local_logits.float(), atol=tolerance, rtol=0)


def test_batched_decode_on_a_node_equals_each_session_alone(checkpoint: Path, pipeline: Pipeline) -> None:
    """Concurrent decode steps run as one forward over the sessions' cache rows; masks, ALiBi, sliding windows
    and positions must not notice. Sessions of different lengths (one in another slab), one of them a
    left-padded batch of two."""
    span = pipeline.spans[1]
    masks = [torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()]
    masks.append(torch.ones(1, 9, dtype=torch.bool))
    max_lengths = [64, 64, 200]
    generator = torch.Generator().manual_seed(0)
    hidden_size = span.hidden_size
    prefills = [torch.randn(*mask.shape, hidden_size, generator=generator) for mask in masks]
    decodes = [torch.randn(mask.shape[0], 1, hidden_size, generator=generator) for mask in masks]

    def prefilled() -> list[Session]:
        sessions = []
        for mask, hidden, max_length in zip(masks, prefills, max_lengths, strict=True):
            session = open_session(span, pipeline.table, mask.shape[0], max_length)
            run_alone(span, session, StepInputs(hidden, position_ids_from_mask(mask), mask, None))
            sessions.append(session)
        return sessions

    def decode(session: Session, hidden: torch.Tensor) -> StepInputs:
        rows = hidden.shape[0]
        return StepInputs(hidden, session.last_positions[:, None] + 1, torch.ones(rows, 1, dtype=torch.bool), None)

    first = prefilled()
    alone = [run_alone(span, s, decode(s, hidden)) for s, hidden in zip(first, decodes, strict=True)]
    pipeline.table.close(first[0].session_id)  # a hole between the rows of the next sessions

    async def pending() -> list[PendingStep]:  # a step's future needs a running event loop
        return [PendingStep(s, decode(s, hidden)) for s, hidden in zip(prefilled(), decodes, strict=True)]

    steps = asyncio.run(pending())
    for batched, single in zip(run_batched(span, steps), alone, strict=True):
        torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)


def test_a_checkpoint_stored_without_the_base_model_prefix_loads(tmp_path: Path) -> None:
    """The layout of the GPT-2 and BLOOM files on the Hub: `h.0.attn...`, not `transformer.h.0.attn...`."""
    checkpoint = build_tiny("gpt2", tmp_path / "gpt2", sharded=False)
    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    save_file({name.removeprefix("transformer."): t for name, t in tensors.items()}, weights, {"format": "pt"})
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    remote = Pipeline.load(checkpoint, split=2).greedy(PROMPT, torch.ones_like(PROMPT), NEW_TOKENS)
    assert remote.tokens.tolist() == local_generate(local, PROMPT, torch.ones_like(PROMPT)).sequences.tolist()


def test_an_unsupported_model_type_is_refused_with_the_supported_ones() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        ModelArchitecture.from_config(ConfigReader({"model_type": "mamba"}))
    message = str(info.value)
    assert "'mamba'" in message
    for model_type in ("bloom", "falcon", "gpt2", "gpt_neox", "gptj", "llama", "mistral", "opt", "qwen2", "qwen3"):
        assert model_type in message


def test_moe_routing_ties_pick_the_experts_transformers_picks(tmp_path: Path) -> None:
    """Two experts with the same router row score the same for every token: whenever one of them is the second
    choice, the tie decides which expert runs. Both sides take `torch.topk` of the same float32 probabilities."""
    checkpoint = build_tiny("mixtral", tmp_path / "mixtral", sharded=False)
    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    for layer in range(4):
        router = tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        router[2] = router[1]
    save_file(tensors, weights, {"format": "pt"})
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    mask = torch.ones_like(PROMPT)
    remote = Pipeline.load(checkpoint, split=2).greedy(PROMPT, mask, NEW_TOKENS)
    expected = local_generate(local, PROMPT, mask)
    assert remote.tokens.tolist() == expected.sequences.tolist()
    for remote_logits, local_logits in zip(remote.logits, expected.logits, strict=True):
        torch.testing.assert_close(remote_logits, local_logits, atol=1e-4, rtol=0)
