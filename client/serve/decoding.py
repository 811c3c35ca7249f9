"""Turning generated token ids into the text, stop decisions and logprobs that OpenAI-style APIs report.

`generate()` hands every step's tokens to `ChoiceTracker` (a stopping criterion, so it sees each token as soon
as it is chosen); the tracker feeds one `TextAssembler` per row. The same code serves streaming (take the
text released so far after each step) and plain responses (read the assembler at the end).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase, StoppingCriteria

DECODE_CONTEXT = 5
"""Tokens decoded before a new one, so that tokenizers which drop or merge spaces at the start of a sequence
still give each token its own text (the incremental scheme of vLLM's detokenizer)."""


@dataclass(frozen=True)
class TokenEntry:
    """One token of a choice: its piece of the text, where that piece starts, and its log-probabilities."""

    text: str
    offset: int
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


class TextAssembler:
    """One choice's text, built token by token after `context_ids` (the prompt).

    A choice ends at an end-of-sequence token or at the first stop sequence; the text excludes either, and
    `overflow` keeps what was generated past the end (the chat command feeds it back into the next turn). The
    concatenated token texts always equal `text`; a token that ends inside a multi-byte character has an
    empty text, its bytes come with the next one."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        context_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        eos_ids: Collection[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.prefix_offset = max(len(self.ids) - DECODE_CONTEXT, 0)
        self.read_offset = len(self.ids)
        self.stop = list(stop)
        self.eos_ids = set(eos_ids)
        self.text = ""
        self.entries: list[TokenEntry] = []
        self.token_count = 0
        self.finish_reason: str | None = None
        self.overflow = ""
        self._released_chars = 0
        self._released_entries = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int, logprob: float | None = None, alternatives: Sequence[tuple[int, float]] = ()) -> None:
        """Append a generated token; ignored once the choice has finished (`generate()` pads finished rows)."""
        if self.finished:
            return
        self.token_count += 1
        if token_id in self.eos_ids:
            self.finish_reason = "stop"
            self.overflow = self.tokenizer.decode([token_id])
            return
        context = self.ids[self.prefix_offset : self.read_offset]
        prefix = self._decode(context)
        top = tuple((self._decode([*context, alt])[len(prefix) :], value) for alt, value in alternatives)
        self.ids.append(token_id)
        full = self._decode(self.ids[self.prefix_offset :])
        piece = ""
        if not full.endswith("\ufffd"):
            piece = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.entries.append(TokenEntry(piece, len(self.text), logprob, top))
        self.text += piece
        self._cut_at_stop(len(self.text) - len(piece))

    def finish(self) -> None:
        """Generation is over: a choice that did not stop by itself ran out of tokens. Bytes of a character
        still incomplete are flushed as `decode()` shows them (a replacement character)."""
        if self.finished:
            return
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            tail = self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
            last = self.entries[-1]
            self.entries[-1] = dataclasses.replace(last, text=last.text + tail)
            self.text += tail
            self.read_offset = len(self.ids)
            self._cut_at_stop(len(self.text) - len(tail))
        if not self.finished:
            self.finish_reason = "length"

    def take(self) -> tuple[str, list[TokenEntry]]:
        """Text and tokens not handed out yet that can no longer turn out to start a stop sequence."""
        end = len(self.text) if self.finished else len(self.text) - self._partial_stop_length()
        end = max(end, self._released_chars)
        text = self.text[self._released_chars : end]
        entries: list[TokenEntry] = []
        while self._released_entries < len(self.entries):
            entry = self.entries[self._released_entries]
            if entry.offset + len(entry.text) > end or not (entry.text or self.finished):
                break
            entries.append(entry)
            self._released_entries += 1
        self._released_chars = end
        return text, entries

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _cut_at_stop(self, new_from: int) -> None:
        if not self.stop:
            return
        start = max(new_from - max(len(stop) for stop in self.stop) + 1, 0)
        hits = [index for stop in self.stop if (index := self.text.find(stop, start)) >= 0]
        if not hits:
            return
        cut = min(hits)
        self.overflow = self.text[cut:]
        self.text = self.text[:cut]
        self.entries = [
            dataclasses.replace(entry, text=entry.text[: cut - entry.offset])
            for entry in self.entries
            if entry.offset < cut
        ]
        self.finish_reason = "stop"

    def _partial_stop_length(self) -> int:
        """Characters at the end of the text that could still grow into a stop sequence."""
        lengths = [
            size
            for stop in self.stop
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1)
            if self.text.endswith(stop[:size])
        ]
        return max(lengths, default=0)


class StepLogprobs(LogitsProcessor):
    """Keeps the log-softmax of the model's own logits at the latest step, for `ChoiceTracker`. Put it first
    among the processors, so penalties and temperature do not change what it reports."""

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.latest = torch.log_softmax(scores.float(), dim=-1)
        return scores


class ChoiceTracker(StoppingCriteria):
    """Feeds each step's tokens to one assembler per row and stops the rows that have finished.

    `on_step` runs after every step (the gateway streams from it); setting `cancel` stops every row (a
    streaming client went away), which also closes the swarm session at once."""

    def __init__(
        self,
        assemblers: Sequence[TextAssembler],
        recorder: StepLogprobs | None = None,
        alternatives: int = 0,
        on_step: Callable[[], None] | None = None,
        cancel: threading.Event | None = None,
        prompt_length: int | None = None,
    ) -> None:
        self.assemblers = list(assemblers)
        self.recorder = recorder
        self.alternatives = alternatives
        self.on_step = on_step
        self.cancel = cancel
        self.seen = prompt_length
        """With the prompt's length: every token since the last call is fed (speculative decoding adds several
        a step, without per-token logprobs); without it, the last one."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        if self.seen is not None and input_ids.shape[1] - self.seen != 1:
            for position in range(self.seen, input_ids.shape[1]):
                for assembler, token in zip(self.assemblers, input_ids[:, position].tolist(), strict=True):
                    assembler.add(token)
            self.seen = input_ids.shape[1]
            return self._after_step()
        if self.seen is not None:
            self.seen = input_ids.shape[1]
        tokens = input_ids[:, -1]
        chosen: list[float | None] = [None] * len(tokens)
        top_ids = top_values = None
        if self.recorder is not None and self.recorder.latest is not None:
            latest = self.recorder.latest
            chosen = latest.gather(1, tokens[:, None]).squeeze(1).tolist()
            if self.alternatives:
                top_values, top_ids = (t.tolist() for t in latest.topk(self.alternatives, dim=-1))
        for row, (assembler, token) in enumerate(zip(self.assemblers, tokens.tolist(), strict=True)):
            alternatives = list(zip(top_ids[row], top_values[row], strict=True)) if top_ids and top_values else []
            assembler.add(token, chosen[row], alternatives)
        return self._after_step()

    def _after_step(self) -> torch.BoolTensor:
        if self.on_step is not None:
            self.on_step()
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(len(self.assemblers), dtype=torch.bool)
        return torch.tensor([assembler.finished for assembler in self.assemblers], dtype=torch.bool)
