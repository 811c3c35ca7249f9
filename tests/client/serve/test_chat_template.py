"""Conversations as text: the chat template when there is one, the plain transcript otherwise, and what a
new turn appends after a reply whose tokens a session already holds."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from swarm.client.serve.chat_template import chat_prompt_ids, chat_stop_strings, next_turn_text, render_chat
from swarm.default_model import default_model_path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HISTORY = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]


@pytest.fixture
def plain() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture
def templated() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.chat_template = CHATML
    return tokenizer


def test_without_a_template_the_transcript_is_plain_and_a_user_line_stops(plain: PreTrainedTokenizerBase) -> None:
    assert render_chat(plain, HISTORY, add_generation_prompt=True) == "System: Be kind.\nUser: Hi\nAssistant:"
    assert chat_stop_strings(plain) == ["\nUser:"]
    assert chat_prompt_ids(plain, "User: Hi")[0] == plain.bos_token_id


def test_next_turn_skips_what_the_model_already_generated(plain: PreTrainedTokenizerBase) -> None:
    assert next_turn_text(plain, HISTORY, "More", overflow="") == "\nUser: More\nAssistant:"
    assert next_turn_text(plain, HISTORY, "More", overflow="\nUser:") == " More\nAssistant:"
    assert next_turn_text(plain, HISTORY, "More", overflow="</s>") == "\nUser: More\nAssistant:"


def test_templates_continue_after_their_end_of_turn_token(templated: PreTrainedTokenizerBase) -> None:
    assert render_chat(templated, HISTORY[1:], True) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_stop_strings(templated) == []
    after = next_turn_text(templated, HISTORY, "More", overflow="<|im_end|>")
    assert after == "\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n"
