"""What `swarm-client chat` keeps of a reply, in the conversation and in its swarm session, when one drafted step
settles tokens past the line that ends the reply."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, StoppingCriteriaList

from swarm.client.cli.chat import ChatSettings, Conversation, reply
from swarm.client.core.remote_cache import RemoteSessionCache
from swarm.client.serve.chat_template import FALLBACK_STOP
from swarm.default_model import default_model_path

REPLY = " Hi there.\nUser: and words the draft ran on with"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_path())  # no chat template: replies end at "\nUser:"


class OneDraftedStep:
    """A model whose `generate()` settles the whole reply in one step, as a draft that guessed it all would, and
    leaves the session holding every token but the last (assisted decoding's bonus token is not fed yet)."""

    def __init__(self, reply_ids: list[int]) -> None:
        self.reply_ids = reply_ids
        self.generation_config = SimpleNamespace(eos_token_id=None)

    def generate(
        self,
        input_ids: torch.Tensor,
        past_key_values: RemoteSessionCache,
        stopping_criteria: StoppingCriteriaList,
        **kwargs: object,
    ) -> torch.Tensor:
        output = torch.cat([input_ids, torch.tensor([self.reply_ids])], dim=1)
        past_key_values.seen_tokens = output.shape[1] - 1
        stopping_criteria(output, torch.zeros(1, 8))
        return output


def test_tokens_a_drafted_step_settled_past_the_stop_line_leave_the_conversation_and_the_session(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    conversation = Conversation(tokenizer)
    conversation.add_user("Hello")
    prompt = list(conversation.ids)
    reply_ids = tokenizer(REPLY, add_special_tokens=False).input_ids
    through_stop = next(n for n in range(1, len(reply_ids) + 1) if FALLBACK_STOP in tokenizer.decode(reply_ids[:n]))
    assert through_stop < len(reply_ids), "the scenario needs tokens after the stop line"
    session = RemoteSessionCache()
    settings = ChatSettings(max_new_tokens=40, max_length=512, temperature=0.0, top_p=1.0, top_k=0, seed=None)
    out = io.StringIO()

    reply(OneDraftedStep(reply_ids), conversation, session, settings, out)  # type: ignore[arg-type]

    assert out.getvalue() == " Hi there.\n"
    assert conversation.ids == prompt + reply_ids[:through_stop]
    assert session.seen_tokens == len(prompt) + through_stop
    conversation.add_user("And then?")
    text = tokenizer.decode(conversation.ids)
    assert "words the draft" not in text
    assert text.endswith("User: And then?\nAssistant:")
