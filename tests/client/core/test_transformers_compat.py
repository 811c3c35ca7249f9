"""The transformers coupling: either spelling of the cache argument works, and a release that would make the
swarm run without its sessions fails loudly instead of printing garbage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from swarm.client.core import transformers_compat
from swarm.client.core.model import DistributedModelForCausalLM
from swarm.client.core.remote_cache import RemoteSessionCache
from swarm.client.core.transformers_compat import (
    CACHE_NAMES,
    RemoteCache,
    causal_lm_output,
    generation_cache_name,
    take_cache,
)
from swarm.errors import IncompatibleTransformersError

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

PROMPT = torch.tensor([[1, 45, 67, 89]])
UNREACHABLE = "ws://127.0.0.1:9"  # nothing may be sent: every failure here happens before the first step


@pytest.fixture(scope="module")
def offline_model(tiny_llama: Path) -> Iterator[DistributedModelForCausalLM]:
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=UNREACHABLE)
    yield model
    model.close()


def test_generate_hands_the_cache_under_the_name_this_release_uses() -> None:
    assert generation_cache_name() in CACHE_NAMES
    output = causal_lm_output(torch.zeros(1, 1, 4), None, RemoteSessionCache())
    assert isinstance(output[generation_cache_name()], RemoteSessionCache)


def test_either_spelling_of_the_cache_argument_is_taken() -> None:
    cache = RemoteSessionCache()
    for name in CACHE_NAMES:
        kwargs = {name: cache, "use_cache": True}
        assert take_cache(kwargs) is cache and kwargs == {"use_cache": True}
    assert take_cache({"cache": cache, "past_key_values": cache}) is cache
    with pytest.raises(ValueError, match="pass the cache once"):
        take_cache({"cache": cache, "past_key_values": RemoteSessionCache()})


def test_a_remote_cache_answers_generate_as_a_full_attention_cache_that_rolls_back_rejected_drafts() -> None:
    """Speculative decoding crops what it rejects: by a negative count (5.20 on) or to a length (older code)."""
    cache = RemoteSessionCache(max_length=32)
    assert cache.is_linear == [False] and cache.is_croppable and not cache.is_compileable
    cache.seen_tokens = 10
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    cache.crop(5)
    assert cache.get_seq_length() == 5
    cache.crop(0)  # nothing to remove
    assert cache.get_seq_length() == 5
    with pytest.raises(NotImplementedError):
        cache.batch_select_indices(torch.tensor([0]))


def test_a_renamed_cache_argument_fails_instead_of_running_stateless(
    offline_model: DistributedModelForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What 5.24 did to 5.23's code: generate() hands the cache under a name the model does not read."""
    monkeypatch.setattr(transformers_compat, "generation_cache_name", lambda: "kv_state")
    with pytest.raises(
        IncompatibleTransformersError, match=rf"transformers {transformers_compat.TRANSFORMERS_VERSION}"
    ):
        offline_model.generate(PROMPT, max_new_tokens=3, do_sample=False)


def test_a_forward_that_loses_the_cache_inside_generate_fails(
    offline_model: DistributedModelForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare = DistributedModelForCausalLM.prepare_inputs_for_generation

    def dropping_the_cache(self, *args, **kwargs):  # a release that forgets to forward the cache
        inputs = prepare(self, *args, **kwargs)
        for name in CACHE_NAMES:
            inputs.pop(name, None)
        return inputs

    monkeypatch.setattr(DistributedModelForCausalLM, "prepare_inputs_for_generation", dropping_the_cache)
    with pytest.raises(IncompatibleTransformersError, match="stateless"):
        offline_model.generate(PROMPT, max_new_tokens=3, do_sample=False)


def test_a_local_cache_is_refused(offline_model: DistributedModelForCausalLM) -> None:
    with pytest.raises(TypeError, match="inference_session"):
        offline_model.generate(PROMPT, max_new_tokens=3, do_sample=False, past_key_values=DynamicCache())


def test_a_session_cache_is_a_remote_cache() -> None:
    assert issubclass(RemoteSessionCache, RemoteCache)


def session_holding(tokens: int) -> RemoteSessionCache:
    session = RemoteSessionCache(max_length=64)
    session.seen_tokens = tokens
    return session


def test_a_first_assisted_step_over_the_whole_sequence_is_trimmed_to_what_the_session_lacks(
    offline_model: DistributedModelForCausalLM,
) -> None:
    """transformers' assisted decoding hands its first step the whole conversation (5.20-5.24); only the tokens
    after those the session holds may go to the swarm, at their own positions."""
    ids = torch.arange(10)[None]
    cache = {generation_cache_name(): session_holding(6)}
    inputs = offline_model.prepare_inputs_for_generation(
        ids, is_first_iteration=True, position_ids=torch.arange(10)[None], **cache
    )
    assert inputs["input_ids"].tolist() == [[6, 7, 8, 9]] and inputs["position_ids"].tolist() == [[6, 7, 8, 9]]
    masked = offline_model.prepare_inputs_for_generation(
        ids, is_first_iteration=True, attention_mask=torch.ones(1, 10, dtype=torch.long), **cache
    )
    assert masked["input_ids"].tolist() == [[6, 7, 8, 9]]


def test_only_new_tokens_or_a_later_step_are_not_trimmed(offline_model: DistributedModelForCausalLM) -> None:
    new_only = torch.arange(6, 10)[None]  # positions say it follows the session: nothing to trim
    cache = {generation_cache_name(): session_holding(3)}
    inputs = offline_model.prepare_inputs_for_generation(
        new_only, is_first_iteration=True, position_ids=torch.arange(6, 10)[None], **cache
    )
    assert inputs["input_ids"].tolist() == [[6, 7, 8, 9]]
    later = offline_model.prepare_inputs_for_generation(
        torch.arange(10)[None], next_sequence_length=2, is_first_iteration=False, **cache
    )
    assert later["input_ids"].tolist() == [[8, 9]]
