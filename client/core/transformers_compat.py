"""Every use swarm makes of `transformers` beyond its stable public API, for every release in the declared range.

Nodes and the client's local modules run swarm's own model code (`swarm.models`); transformers remains for
tokenizers, chat templates and `generate()` on the client, whose coupling lives here: the cache argument's
name (`cache` from 5.24, `past_key_values` before: `generation_cache_name`), the `Cache` attributes
`generate()` reads (`RemoteCache`), the private hook `_prepare_cache_for_generation`
(`RemoteCacheGenerationMixin`), the output field that carries the cache (`causal_lm_output`), how assisted
generation starts from a session that already holds tokens (`prepare_inputs_for_generation`) and how it calls a
draft model (`merge_draft_generate_arguments`). Each is found
by looking at the installed release (signatures), not by comparing version numbers, so the next rename is a
change to this file alone.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import Cache, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.errors import IncompatibleTransformersError

TRANSFORMERS_VERSION: str = transformers.__version__

CACHE_NAMES = ("cache", "past_key_values")
"""Every name `generate()` has passed the cache under, newest first."""


def incompatible(what: str) -> IncompatibleTransformersError:
    return IncompatibleTransformersError(
        f"transformers {TRANSFORMERS_VERSION}: {what}. swarm supports the range its pyproject.toml declares; "
        "install a release inside it (pip install -e . picks one)."
    )


# --- client: generate() -----------------------------------------------------------------------------------------


@functools.cache
def generation_cache_name() -> str:
    """The keyword `generate()` hands the model its cache under: `cache` from 5.24, `past_key_values` before."""
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise incompatible(f"prepare_inputs_for_generation takes none of {', '.join(CACHE_NAMES)}")


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Pop the cache from keyword arguments, under whichever name the caller used (users of either release
    write theirs); passing two different caches is an error."""
    given = {name: kwargs.pop(name) for name in CACHE_NAMES if kwargs.get(name) is not None}
    caches = {id(cache): cache for cache in given.values()}
    if len(caches) > 1:
        raise ValueError(f"pass the cache once, as `{generation_cache_name()}`, not as {' and '.join(given)}")
    return next(iter(caches.values()), None)


def causal_lm_output(logits: torch.Tensor, loss: torch.Tensor | None, cache: Cache | None) -> CausalLMOutputWithPast:
    """A causal LM output carrying `cache` in the field `generate()` reads it back from."""
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{generation_cache_name(): cache})


class RemoteCache(Cache):
    """A `Cache` whose keys and values live elsewhere (on swarm nodes). It answers what `generate()` asks a
    cache, with the answers a full-attention cache gives; what only a local cache can do (crop, select rows)
    raises instead of silently doing nothing."""

    is_compileable = False

    def __init__(self) -> None:
        super().__init__(layers=[])

    @property
    def is_croppable(self) -> bool:  # generate() then never runs ahead of its stopping check
        return False

    @property
    def is_linear(self) -> list[bool]:  # full attention: generate() trims prompts it has already seen
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a swarm session cannot drop tokens it has already sent to its peers")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a swarm session's batch size is fixed when it opens")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a swarm session's batch size is fixed when it opens")


@dataclass
class GenerateCall:
    """One `generate()` running on a thread: the cache each of its forwards must receive (None when it runs
    without one) and the caches it opened itself, closed when it returns."""

    expected: Cache | None = None
    owned: list[Cache] = field(default_factory=list)
    assistant_tokens: int = 0
    """Tokens a step its assistant model (`assistant_model=`) drafts, which the session must have room for: the
    assistant's own generation config holds the count."""


class RemoteCacheGenerationMixin(GenerationMixin):
    """`generate()` for a model whose cache is a `RemoteCache`: it opens one sized to `generate()`'s
    `max_length` (instead of a local `DynamicCache`), takes the user's under either argument name, closes the
    ones it opened, and checks that every forward it runs receives the cache (`check_forward_cache`).

    Subclasses implement `new_generation_cache` and `close_cache`, and set `self.generate_calls =
    threading.local()` in `__init__` (each thread runs its own `generate()` calls)."""

    generate_calls: threading.local

    def new_generation_cache(self, max_length: int) -> RemoteCache:
        raise NotImplementedError

    def close_cache(self, cache: RemoteCache) -> None:
        raise NotImplementedError

    def _call_stack(self) -> list[GenerateCall]:
        if not hasattr(self.generate_calls, "stack"):
            self.generate_calls.stack = []
        return self.generate_calls.stack

    def current_generate_call(self) -> GenerateCall | None:
        """The innermost `generate()` running on this thread, if any."""
        stack = self._call_stack()
        return stack[-1] if stack else None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        cache = take_cache(kwargs)
        if cache is not None:
            kwargs[generation_cache_name()] = cache
        stack = self._call_stack()
        assistant_config = getattr(kwargs.get("assistant_model"), "generation_config", None)
        stack.append(GenerateCall(assistant_tokens=int(getattr(assistant_config, "num_assistant_tokens", None) or 0)))
        try:
            return super().generate(*args, **kwargs)
        finally:
            for owned in reversed(stack.pop().owned):
                self.close_cache(owned)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args: Any, **kwargs: Any) -> Any:
        """transformers' private hook (same signature 5.20-5.24) where `generate()` creates its cache."""
        name, call = generation_cache_name(), self.current_generate_call()
        use_cache = generation_config.use_cache is not False
        cache = model_kwargs.get(name)
        _check_remote(cache)
        if cache is None and use_cache:
            room = generation_config.max_length + speculative_room(generation_config, call)
            cache = model_kwargs[name] = self.new_generation_cache(room)
            if call is not None:
                call.owned.append(cache)
                call.expected = cache
            return None
        if call is not None:
            call.expected = cache if use_cache else None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Assisted generation's first step hands over the whole sequence untrimmed, even when the session already
        holds its start (a conversation's earlier turns): plain decoding's prefill trims it, assisted decoding
        does not (5.20-5.24). Trim it here the same way, so a multi-turn session can draft; the swarm would
        refuse positions it has already seen. The cache comes under either name (`CACHE_NAMES`), as transformers
        checks `generate()`'s arguments against this signature."""
        session = cache if cache is not None else past_key_values
        if (
            next_sequence_length is None
            and is_first_iteration
            and isinstance(session, RemoteCache)
            and 0 < session.get_seq_length() < input_ids.shape[1]
            and inputs_embeds is None
            and _whole_sequence(input_ids, attention_mask, kwargs.get("position_ids"))
        ):
            next_sequence_length = input_ids.shape[1] - session.get_seq_length()
        if session is not None:
            kwargs[generation_cache_name()] = session
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    def check_forward_cache(self, cache: Any, leftovers: dict[str, Any]) -> None:
        """Fail loudly where a release would make `forward` run without its swarm session: a cache under a name
        this module does not know, a cache that is not a swarm session, or none while `generate()` has one."""
        stray = [name for name, value in leftovers.items() if isinstance(value, Cache)]
        if stray:
            raise incompatible(
                f"generate() passed its cache as `{stray[0]}`, but swarm expects `{generation_cache_name()}`"
            )
        _check_remote(cache)
        call = self.current_generate_call()
        if call is not None and call.expected is not None and cache is not call.expected:
            raise incompatible(
                f"generate() ran a forward without its swarm session (expected the cache as "
                f"`{generation_cache_name()}`): every step would be stateless"
            )


def merge_draft_generate_arguments(draft: Any) -> None:
    """transformers' assisted generation calls the draft model's `generate()` with a generation config and
    generation arguments both, which that `generate()` then logs as deprecated on every process's first draft: a
    complaint about transformers' own call. The draft's `generate` here folds the arguments into a copy of the
    config first, the same call without the warning."""
    generate = draft.generate

    @functools.wraps(generate)
    def merged(*args: Any, generation_config: Any = None, **kwargs: Any) -> Any:
        if generation_config is not None and kwargs:
            generation_config = copy.deepcopy(generation_config)
            kwargs = generation_config.update(**kwargs)
        return generate(*args, generation_config=generation_config, **kwargs)

    draft.generate = merged


def _whole_sequence(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> bool:
    """Whether `generate()` handed over the whole sequence rather than only what follows the session: a mask
    then spans all of it; without one (transformers drops a mask of all ones, so there is no padding) the
    positions then start at 0."""
    if attention_mask is not None:
        return attention_mask.shape[1] == input_ids.shape[1]
    return position_ids is not None and position_ids.numel() > 0 and int(position_ids[0, 0]) == 0


def speculative_room(generation_config: Any, call: GenerateCall | None) -> int:
    """Tokens beyond `max_length` a session may briefly hold: speculative decoding sends its drafts before it
    knows how many it keeps, and near the end they may run past `max_length` before being rolled back."""
    drafts = [getattr(generation_config, "prompt_lookup_num_tokens", None)]
    if call is not None and call.assistant_tokens:
        drafts += [call.assistant_tokens, getattr(generation_config, "num_assistant_tokens", None)]
    return max([0, *(int(d) + 1 for d in drafts if d)])


def _check_remote(cache: object) -> None:
    if cache is not None and not isinstance(cache, RemoteCache):
        raise TypeError(
            f"a swarm model's cache is a swarm session (model.inference_session()), not {type(cache).__name__}"
        )
