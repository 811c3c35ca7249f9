"""A conversation as the text a model continues: the tokenizer's chat template when it has one, else a plain
"Role: text" transcript (base models, the embedded demo model), where a new "User:" line ends the reply."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
FALLBACK_STOP = "\nUser:"
REPLY_MARK = "\ue000reply\ue000"
"""Private-use characters that no template alters: rendering a conversation with this as the last reply shows
what the template writes after a reply."""

Message = dict[str, str]


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )  # type: ignore[return-value]
    text = "".join(f"{FALLBACK_ROLES[m['role']]}: {m['content']}\n" for m in messages)
    return text + "Assistant:" if add_generation_prompt else text


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a rendered conversation: templates write their own special tokens (BOS), the fallback
    transcript gets the tokenizer's."""
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template).input_ids


def chat_stop_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Templates end a reply with an end-of-turn token the model generates; the fallback transcript with a line."""
    return [] if tokenizer.chat_template else [FALLBACK_STOP]


def next_turn_text(
    tokenizer: PreTrainedTokenizerBase, history: Sequence[Message], user_message: str, overflow: str
) -> str:
    """Text to append after a reply's generated tokens so the conversation continues with `user_message`.

    `history` ends with the user message the reply answered. The reply's tokens stay as generated (a session
    holds them), so only what the template writes after a reply, then the new turn, is added; `overflow` (what
    was generated past the reply: an end-of-turn token or the stop line) is already there and is skipped."""
    conversation = [*history, {"role": "assistant", "content": REPLY_MARK}, {"role": "user", "content": user_message}]
    rendered = render_chat(tokenizer, conversation, add_generation_prompt=True)
    if REPLY_MARK not in rendered:
        raise ValueError("the chat template dropped the assistant's reply; it cannot continue a conversation")
    after = rendered.split(REPLY_MARK, 1)[1]
    return after[len(overflow) :] if overflow and after.startswith(overflow) else after
