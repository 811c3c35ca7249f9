"""Logits processors that Hugging Face `generate()` runs for the gateway, `batch` and `chat`.

Sampling draws from a per-request `torch.Generator` (`SeededSampler`) instead of torch's global one: the
gateway runs many `generate()` calls at once in threads, and a shared generator would make `seed` mean nothing.
The sampler masks every other token, so `generate()` itself runs greedy (`do_sample=False`) and picks it.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

GREEDY_BELOW = 1e-5
"""Temperatures under this decode greedily (as vLLM does): sampling there already picks the likeliest token unless
two logits are within 1e-4 of each other, and far smaller ones overflow the logits to inf (then NaN)."""


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties over the tokens generated so far (not the prompt): a token seen `c` times loses
    `frequency * c`, plus `presence` once if `c > 0`. Negative values encourage repetition instead."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class SeededSampler(LogitsProcessor):
    """Draw the next token from `softmax(scores)` with this request's own generator; keep only that token."""

    def __init__(self, seed: int | None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def sampling_processors(
    temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int | None = None
) -> list[LogitsProcessor]:
    """Warpers in `generate()`'s own order, then the sampler; temperature 0 (or below `GREEDY_BELOW`) means greedy
    (nothing to add)."""
    if temperature < GREEDY_BELOW:
        return []
    processors: list[LogitsProcessor] = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(SeededSampler(seed))
    return processors
