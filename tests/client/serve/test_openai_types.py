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
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "must not be empty"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "stream"),
        ({"prompt": []}, "at least one prompt"),
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
