"""Log-likelihoods of whole token sequences from one stateless pass through the swarm (no KV cache held
anywhere): `swarm-client score`, and the prompt logprobs of `echo` requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from swarm.client.serve.decoding import TextAssembler, TokenEntry


@dataclass(frozen=True)
class TokenScores:
    """Each token's log-probability given the tokens before it; the first token has none (nothing precedes it),
    so `logprobs[i]` and `top[i]` belong to `ids[i + 1]`."""

    ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]

    @property
    def total(self) -> float:
        return sum(self.logprobs)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as `generate()` wants it: padding on the left, so every row's last token is the newest.

    Padding by hand, not with the tokenizer: a fast tokenizer asked to pad from several threads at once fails."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
    return input_ids, mask


def score_sequences(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    alternatives: int = 0,
    batch_size: int = 8,
    tuning: object | None = None,
) -> list[TokenScores]:
    """Score `sequences` in left-padded batches of `batch_size`; `alternatives` most likely tokens per position;
    `tuning`: a swarm model's soft prompt and/or adapter for these passes (default: the model's own)."""
    extra = {"tuning": tuning} if tuning is not None else {}
    results: list[TokenScores] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        input_ids, mask = left_pad(batch, pad_id)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask, **extra).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, ids in enumerate(batch):
            results.append(_row_scores(list(ids), logprobs[row, input_ids.shape[1] - len(ids) : -1], alternatives))
    return results


def _row_scores(ids: list[int], predictions: torch.Tensor, alternatives: int) -> TokenScores:
    if len(ids) < 2:
        return TokenScores(ids, [], [])
    targets = torch.tensor(ids[1:], dtype=torch.long)
    chosen = predictions.gather(1, targets[:, None]).squeeze(1).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if alternatives:
        values, indices = predictions.topk(alternatives, dim=-1)
        top = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return TokenScores(ids, chosen, top)


def token_entries(tokenizer: PreTrainedTokenizerBase, scores: TokenScores) -> list[TokenEntry]:
    """Each token of a scored sequence with its text and logprobs (None for the first), as the APIs report it."""
    assembler = TextAssembler(tokenizer)
    assembler.add(scores.ids[0])
    for token, logprob, top in zip(scores.ids[1:], scores.logprobs, scores.top, strict=True):
        assembler.add(token, logprob, top)
    return assembler.entries
