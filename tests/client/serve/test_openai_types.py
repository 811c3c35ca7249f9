"""Requests are validated before any work: bounds, unknown fields, and combinations OpenAI refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from swarm.client.serve.generate_api import GenerateRequest
from swarm.client.serve.openai_types import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"prompt": ["a"] * 65}, "at most 64 prompts"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "at least 1 character"),
        ({"echo": 0}, "echo"),
        ({"seed": False}, "seed"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "stream"),
        ({"prompt": []}, "at least one prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"suffix": "x"}, "suffix"),
    ],
)
def test_invalid_completion_requests_are_refused(fields: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        CompletionRequest.model_validate({"prompt": "hi", **fields})


def test_nulls_mean_defaults_and_every_prompt_form_is_accepted() -> None:
    request = CompletionRequest.model_validate({"prompt": "hi", "temperature": None, "stop": None, "n": None})
    assert (request.temperature, request.n, request.stop_sequences) == (1.0, 1, [])
    for prompt in ("hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert CompletionRequest(prompt=prompt).prompt == prompt
    assert CompletionRequest(prompt="x", stop="\n").stop_sequences == ["\n"]


def test_chat_requests_take_text_parts_and_need_logprobs_for_top_logprobs() -> None:
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert request.messages[0].text == "ab"
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    with pytest.raises(ValidationError, match="messages"):
        ChatCompletionRequest.model_validate({"messages": []})
    with pytest.raises(ValidationError, match="role"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "robot", "content": "x"}]})


def test_generate_requests_refuse_unknown_fields_and_beam_sampling() -> None:
    with pytest.raises(ValidationError, match="max_new_tokens"):
        GenerateRequest.model_validate({"prompt": "hi", "max_new_tokens": 5})
    with pytest.raises(ValidationError, match="beam sampling"):
        GenerateRequest(prompt="hi", do_sample=True, num_beams=2)
    with pytest.raises(ValidationError, match="min_length"):
        GenerateRequest(prompt="hi", min_length=10, max_length=5)
    assert GenerateRequest(prompt=["a", "b"]).prompts == ["a", "b"]


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),
        ({"repetition_penalty": 11}, "repetition_penalty"),
        ({"seed": 2**64}, "seed"),
        ({"top_k": 2**63}, "top_k"),
    ],
)
def test_generate_requests_refuse_numbers_that_break_sampling(fields: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        GenerateRequest.model_validate({"prompt": "hi", **fields})


def test_the_schema_says_null_means_the_default() -> None:
    """OpenAI's clients send `null` for fields they leave unset; the schema must allow what the gateway accepts."""
    properties = CompletionRequest.model_json_schema()["properties"]
    for name in ("echo", "temperature", "n", "stream", "logprobs", "seed"):
        assert {"type": "null"} in properties[name].get("anyOf", []), name
    assert CompletionRequest.model_validate({"prompt": "hi", "echo": None}).echo is False


def test_bounds_in_the_schema_are_json_schema_keywords() -> None:
    """pydantic writes `ge`/`le` (which JSON schema ignores) where it cannot place a bound; none may be left."""

    def keys(node: object) -> set[str]:
        if isinstance(node, dict):
            return set(node) | {key for value in node.values() for key in keys(value)}
        return {key for value in node for key in keys(value)} if isinstance(node, list) else set()

    for model in (CompletionRequest, ChatCompletionRequest, GenerateRequest):
        assert not {"ge", "le", "gt", "lt"} & keys(model.model_json_schema()), model.__name__


def test_integers_may_be_written_as_whole_floats_but_nothing_else_is_coerced() -> None:
    request = CompletionRequest.model_validate({"prompt": [1.0, 2.0], "n": 2.0, "best_of": 3.0})
    assert (request.prompt, request.n, request.best_of) == ([1, 2], 2, 3)
    for fields in ({"n": 2.5}, {"n": "2"}, {"echo": "true"}, {"temperature": "1"}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"prompt": "hi", **fields})


def test_lone_surrogates_in_any_text_become_replacement_characters() -> None:
    """`"\\ud800"` is valid JSON but no Unicode text; tokenizers fail on it."""
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800b"}]}], "stop": "\udc00"}
    )
    assert chat.messages[0].text == "a\ufffdb" and chat.stop == "\ufffd"
    assert GenerateRequest.model_validate({"prompt": ["x\udfff"], "bad_words": ["\ud800"]}).bad_words == ["\ufffd"]
