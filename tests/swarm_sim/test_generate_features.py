"""Hugging Face `generate()` features through a real swarm equal the same features run locally.

Each test also checks that its feature changed the output (or stopped it) where that can be seen, so an
option the swarm silently dropped would not pass. Seeded single-prompt sampling and multi-turn
continuation are in `test_generation.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from swarm.client import DistributedModelForCausalLM

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7, 99, 14, 300, 8]])
NEW_TOKENS = 20


def both(
    remote: DistributedModelForCausalLM, local: PreTrainedModel, seed: int | None = None, **kwargs: object
) -> tuple[list[list[int]], list[list[int]]]:
    """The same `generate` call through the swarm and locally (from the same seed when sampling)."""
    outputs = []
    for model in (remote, local):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(model.generate(**{"inputs": PROMPT, "max_new_tokens": NEW_TOKENS, **kwargs}).tolist())
    return outputs[0], outputs[1]


@pytest.fixture(scope="module")
def greedy(local_llama: PreTrainedModel) -> list[int]:
    """The plain greedy continuation, to see each feature change it."""
    return local_llama.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT.shape[1] :].tolist()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_repetition_penalty(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel, greedy: list[int]
) -> None:
    remote, local = both(swarm_llama, local_llama, do_sample=False, repetition_penalty=1.5)
    assert remote == local
    assert remote[0][PROMPT.shape[1] :] != greedy


def test_no_repeat_ngram_size(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel, greedy: list[int]
) -> None:
    remote, local = both(swarm_llama, local_llama, do_sample=False, no_repeat_ngram_size=2)
    assert remote == local
    assert remote[0][PROMPT.shape[1] :] != greedy


def test_bad_words_ids(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel, greedy: list[int]
) -> None:
    banned = [[greedy[0]], greedy[4:6]]
    remote, local = both(swarm_llama, local_llama, do_sample=False, bad_words_ids=banned)
    assert remote == local
    assert remote[0][PROMPT.shape[1]] != greedy[0]


def test_min_new_tokens(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel, greedy: list[int]
) -> None:
    """The third greedy token becomes EOS: without `min_new_tokens` generation would stop there."""
    remote, local = both(swarm_llama, local_llama, do_sample=False, eos_token_id=greedy[2], min_new_tokens=8)
    assert remote == local
    assert len(remote[0]) >= PROMPT.shape[1] + 8


def test_stop_strings(
    swarm_llama: DistributedModelForCausalLM,
    local_llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    inputs = tokenizer("Once upon a time", return_tensors="pt")
    plain = local_llama.generate(**inputs, max_new_tokens=30, do_sample=False)
    stop = tokenizer.decode(plain[0, inputs.input_ids.shape[1] :]).split()[2]
    kwargs = dict(max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    remote = swarm_llama.generate(**inputs, **kwargs)
    assert remote.tolist() == local_llama.generate(**inputs, **kwargs).tolist()
    assert remote.shape[1] < plain.shape[1]
    assert tokenizer.decode(remote[0, inputs.input_ids.shape[1] :]).endswith(stop)


def test_num_return_sequences_with_sampling(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    remote, local = both(swarm_llama, local_llama, seed=7, do_sample=True, num_return_sequences=3, top_k=50)
    assert remote == local
    assert len(remote) == 3 and len({tuple(row) for row in remote}) > 1


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel, num_return_sequences: int
) -> None:
    kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        num_beams=3,
        num_return_sequences=num_return_sequences,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    remote = swarm_llama.generate(PROMPT, **kwargs)
    local = local_llama.generate(PROMPT, **kwargs)
    assert remote.sequences.tolist() == local.sequences.tolist()
    torch.testing.assert_close(remote.sequences_scores, local.sequences_scores, atol=1e-4, rtol=0)


def test_sampling_with_temperature_top_k_top_p_on_a_padded_batch(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    short, long = [1, 500, 400, 300], PROMPT[0].tolist()
    batch = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
    kwargs = dict(attention_mask=mask, do_sample=True, temperature=0.7, top_k=30, top_p=0.9, pad_token_id=0)
    outputs = []
    for model in (swarm_llama, local_llama):
        torch.manual_seed(2024)
        outputs.append(model.generate(batch, max_new_tokens=NEW_TOKENS, **kwargs).tolist())
    assert outputs[0] == outputs[1]
