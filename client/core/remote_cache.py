"""The Hugging Face `Cache` that stands for KV caches held by remote peers.

`generate()` asks a cache how many tokens it has seen (to feed only new tokens), and asks it to
reorder rows for beam search; this one answers from its swarm session, which it opens lazily on
the first forward (when the real batch size is known) and reserves `max_length` tokens for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from swarm.client.core.transformers_compat import RemoteCache

if TYPE_CHECKING:
    from swarm.client.core.sessions import ChainSession


class RemoteSessionCache(RemoteCache):
    """Tokens seen so far by a chain session; owned by `generate()` or by the user (multi-turn)."""

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__()
        self.max_length = max_length
        self.session: ChainSession | None = None
        self.seen_tokens = 0
        self.prefix_tokens = 0
        """Soft-prompt tokens in front of the session (not part of what `generate()` counts); every position
        sent to the swarm is this far along."""
        self.pending_hypo_ids: torch.Tensor | None = None
        self.closed = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_croppable(self) -> bool:
        """Speculative decoding (`generate(prompt_lookup_num_tokens=...)`, `assistant_model=`) rolls back the
        tokens it rejects: `crop`."""
        return True

    def activate_past_recording(self) -> None:
        """Assisted generation asks caches to keep what they might roll back; the peers' sessions keep it all."""

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a positive value: keep that many, the older convention), on
        every peer of the session with its next step."""
        keep = tokens_to_remove if tokens_to_remove > 0 else self.seen_tokens + tokens_to_remove
        removed = self.seen_tokens - max(keep, 0)
        if removed <= 0:
            return
        if self.session is not None:
            self.session.cut(removed)
        self.seen_tokens -= removed

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length or -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Remember the reordering; it travels with the next step as `hypo_ids`."""
        beam_idx = beam_idx.to("cpu")
        self.pending_hypo_ids = beam_idx if self.pending_hypo_ids is None else self.pending_hypo_ids[beam_idx]

    def take_hypo_ids(self) -> torch.Tensor | None:
        hypo_ids, self.pending_hypo_ids = self.pending_hypo_ids, None
        if hypo_ids is not None and torch.equal(hypo_ids, torch.arange(len(hypo_ids))):
            return None
        return hypo_ids

    def __repr__(self) -> str:
        return f"RemoteSessionCache(seen_tokens={self.seen_tokens}, max_length={self.max_length})"
