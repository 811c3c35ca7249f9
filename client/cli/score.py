"""`swarm-client score FILE`: log-likelihoods of texts, one JSON line each, from stateless passes through the
swarm (no KV cache anywhere, batched with padding). With `--choices`, each line is a context and every choice
a continuation of it; the likeliest is reported (multiple-choice evaluation)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from swarm.client.cli.resolve import open_model
from swarm.client.core.settings import ClientSettings
from swarm.client.serve.scoring import TokenScores, score_sequences, token_entries


def read_texts(path: Path) -> Iterator[str]:
    """One text per line; lines that are JSON objects give their "text" field (JSONL). Blank lines are skipped."""
    with open(path, encoding="utf-8") if str(path) != "-" else sys.stdin as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                record = json.loads(line)
                if not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: a JSON line needs a string field 'text'")
                yield record["text"]
            else:
                yield line


def text_result(tokenizer: PreTrainedTokenizerBase, text: str, scores: TokenScores) -> dict[str, object]:
    """The total, and every token with its logprob; the first token has none (null), as in OpenAI's `echo`."""
    entries = token_entries(tokenizer, scores)
    return {
        "text": text,
        "logprob": scores.total,
        "tokens": [entry.text for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
    }


def choice_result(text: str, choices: list[str], scores: list[TokenScores], context_length: int) -> dict[str, object]:
    """A continuation's log-likelihood is the sum over its own tokens (those after the context's)."""
    totals = {choice: sum(score.logprobs[context_length - 1 :]) for choice, score in zip(choices, scores, strict=True)}
    return {"text": text, "choices": totals, "best": max(totals, key=totals.__getitem__)}


def score_texts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int
) -> Iterator[dict[str, object]]:
    pad = _pad_id(tokenizer)
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        scores = score_sequences(model, [tokenizer(text).input_ids for text in batch], pad, batch_size=batch_size)
        for text, score in zip(batch, scores, strict=True):
            yield text_result(tokenizer, text, score)


def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    choices: list[str],
    separator: str,
    batch_size: int,
) -> Iterator[dict[str, object]]:
    for text in texts:
        context = tokenizer(text).input_ids
        sequences = [context + continuation_ids(tokenizer, text, separator + choice) for choice in choices]
        scores = score_sequences(model, sequences, _pad_id(tokenizer), batch_size=batch_size)
        yield choice_result(text, choices, scores, len(context))


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    texts = list(read_texts(Path(args.file)))
    choices = [choice.strip() for choice in args.choices.split(",") if choice.strip()] if args.choices else []
    model, tokenizer = open_model(settings)
    try:
        if choices:
            records = score_choices(model, tokenizer, texts, choices, args.separator, args.batch_size)
        else:
            records = score_texts(model, tokenizer, texts, args.batch_size)
        for record in records:
            print(json.dumps(record), flush=True)
    finally:
        model.close()
    return 0


def continuation_ids(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> list[int]:
    """Tokens of `continuation` as they follow `context`: tokenize both together and keep the tail, so a
    continuation starting with a space gets the same tokens it would have in running text."""
    whole = tokenizer(context + continuation).input_ids
    head = tokenizer(context).input_ids
    return (
        whole[len(head) :]
        if whole[: len(head)] == head
        else tokenizer(continuation, add_special_tokens=False).input_ids
    )
