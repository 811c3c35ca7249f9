"""The Hugging Face cache that stands for remote KV caches."""

from __future__ import annotations

import pytest
import torch

from swarm.client.core.model import position_ids_from_mask
from swarm.client.core.remote_cache import RemoteSessionCache

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)


def test_beam_reorders_compose_until_the_next_step() -> None:
    cache = RemoteSessionCache(max_length=16)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    cache.reorder_cache(torch.tensor([1, 0, 0]))
    # row i after both reorders is original row first[second[i]]
    assert cache.take_hypo_ids().tolist() == [2, 2, 2]
    assert cache.take_hypo_ids() is None


def test_identity_reorders_are_not_sent() -> None:
    cache = RemoteSessionCache()
    cache.reorder_cache(torch.arange(4))
    assert cache.take_hypo_ids() is None


def test_the_cache_reports_tokens_seen_for_generate() -> None:
    cache = RemoteSessionCache(max_length=32)
    cache.seen_tokens = 7
    assert cache.get_seq_length() == 7 and cache.get_max_length() == 32 and not cache.is_compileable


def test_positions_follow_generate_for_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
