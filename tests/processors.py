"""Logits processors that tests slip into `generate()` to act at a chosen decoding step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LogitsProcessor


class AtStep(LogitsProcessor):
    """Calls `action` once, right after decoding step `step`, without touching the scores."""

    def __init__(self, step: int, action: Callable[[], None]) -> None:
        self.step, self.action, self.calls = step, action, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.calls += 1
        if self.calls == self.step:
            self.action()
        return scores
