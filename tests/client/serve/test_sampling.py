"""OpenAI's penalties and per-request seeded sampling, as logits processors."""

from __future__ import annotations

import threading

import pytest
import torch

from swarm.client.serve.openai_types import MAX_SEED
from swarm.client.serve.sampling import PresenceFrequencyPenalty, SeededSampler, sampling_processors


def test_penalties_count_generated_tokens_only() -> None:
    prompt = torch.tensor([[3, 3, 3]])
    generated = torch.tensor([[1, 1, 2]])
    penalty = PresenceFrequencyPenalty(prompt_length=3, presence=0.5, frequency=0.25)
    scores = penalty(torch.cat([prompt, generated], dim=1), torch.zeros(1, 5))
    assert scores.tolist() == [[0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0, 0.0]]


def test_penalties_leave_the_first_step_alone() -> None:
    penalty = PresenceFrequencyPenalty(prompt_length=2, presence=2.0, frequency=2.0)
    scores = torch.randn(1, 4)
    assert torch.equal(penalty(torch.tensor([[1, 2]]), scores), scores)


def test_seeded_sampler_keeps_one_token_and_repeats_its_choices() -> None:
    scores = torch.randn(3, 50)
    picks = [SeededSampler(11)(torch.zeros(3, 1, dtype=torch.long), scores) for _ in range(2)]
    assert torch.equal(picks[0], picks[1])
    assert ((picks[0] == 0).sum(dim=1) == 1).all() and torch.isinf(picks[0]).sum() == 3 * 49


def test_seeds_hold_while_other_threads_sample() -> None:
    scores = torch.randn(1, 1000)

    def draw(seed: int) -> list[int]:
        sampler = SeededSampler(seed)
        return [int(sampler(torch.zeros(1, 1, dtype=torch.long), scores).argmax()) for _ in range(200)]

    expected = draw(5)
    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(draw(5))) for _ in range(4)]
    noise = threading.Thread(target=lambda: [torch.multinomial(torch.ones(100), 1) for _ in range(2000)])
    for thread in [*threads, noise]:
        thread.start()
    for thread in [*threads, noise]:
        thread.join()
    assert results == [expected] * 4


def test_temperature_zero_is_greedy_and_others_end_with_the_sampler() -> None:
    assert sampling_processors(0.0, top_p=0.5) == []
    kinds = [type(p).__name__ for p in sampling_processors(0.7, top_p=0.9, top_k=5, seed=1)]
    assert kinds == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "SeededSampler"]


@pytest.mark.parametrize("temperature", [1e-80, 5e-324, 1e-6])
def test_tiny_temperatures_pick_the_likeliest_token_instead_of_failing(temperature: float) -> None:
    scores = torch.tensor([[3.0, 9.5, -2.0, 9.0]])
    processors = sampling_processors(temperature, top_p=0.5, top_k=3, seed=1)
    for processor in processors:
        scores = processor(torch.zeros(1, 1, dtype=torch.long), scores)
    assert int(scores.argmax()) == 1 and not torch.isnan(scores).any()


def test_the_largest_seed_a_request_may_carry_seeds_the_sampler() -> None:
    scores = torch.randn(1, 50)
    first = SeededSampler(MAX_SEED)(torch.zeros(1, 1, dtype=torch.long), scores)
    assert torch.equal(first, SeededSampler(MAX_SEED)(torch.zeros(1, 1, dtype=torch.long), scores))
