"""`swarm-client chat`: a conversation in the terminal, streamed as it is generated.

The whole conversation lives in ONE swarm session (`model.inference_session`, passed to `generate()` as
`past_key_values`): each turn sends the swarm only the new user turn, never the history again. So the reply's
tokens are kept exactly as generated, and only the text the chat template puts after a reply, plus the new turn,
is tokenized (`chat_format.next_turn_text`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

import torch
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, StoppingCriteriaList

from swarm.client.cli.resolve import open_model
from swarm.client.core.drafts import load_draft_model, speculation_kwargs
from swarm.client.core.model import DistributedModelForCausalLM
from swarm.client.core.remote_cache import RemoteSessionCache
from swarm.client.core.settings import ClientSettings
from swarm.client.serve.chat_template import Message, chat_prompt_ids, chat_stop_strings, next_turn_text, render_chat
from swarm.client.serve.decoding import ChoiceTracker, TextAssembler
from swarm.client.serve.sampling import sampling_processors

PROMPT = "you> "
HELP = "Chat with the model. /reset starts a new conversation, /quit (or Ctrl-D) leaves."


@dataclass
class Conversation:
    """The messages so far and the exact token ids given to (or due to) the swarm session."""

    tokenizer: PreTrainedTokenizerBase
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    overflow: str = ""

    def add_user(self, text: str) -> None:
        user = {"role": "user", "content": text}
        if not self.messages:
            self.messages = [{"role": "system", "content": self.system}] if self.system else []
            self.messages.append(user)
            self.ids = chat_prompt_ids(self.tokenizer, render_chat(self.tokenizer, self.messages, True))
            return
        suffix = next_turn_text(self.tokenizer, self.messages[:-1], text, self.overflow)
        self.ids += self.tokenizer(suffix, add_special_tokens=False).input_ids
        self.messages.append(user)

    def add_reply(self, text: str, generated: list[int], overflow: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self.ids += generated
        self.overflow = overflow


@dataclass(frozen=True)
class ChatSettings:
    max_new_tokens: int
    max_length: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    speculation: Mapping[str, object] = field(default_factory=dict)
    """`generate()` arguments that draft tokens for the swarm to check (`speculation_kwargs`): a drafted token is
    kept only where it is what the reply's own sampling picked, so replies keep their distribution."""


def reply(
    model: DistributedModelForCausalLM,
    conversation: Conversation,
    session: RemoteSessionCache,
    settings: ChatSettings,
    out: TextIO,
) -> None:
    """Generate the model's turn into `conversation`, writing its text to `out` as it comes."""
    tokenizer = conversation.tokenizer
    room = settings.max_length - len(conversation.ids)
    if room <= 0:
        out.write(f"(the conversation fills its session of {settings.max_length} tokens; /reset to start over)\n")
        return
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    assembler = TextAssembler(tokenizer, conversation.ids, chat_stop_strings(tokenizer), eos_ids)

    def show() -> None:
        out.write(assembler.take()[0])
        out.flush()

    input_ids = torch.tensor([conversation.ids])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        past_key_values=session,
        max_new_tokens=min(settings.max_new_tokens, room),
        do_sample=False,
        pad_token_id=pad,
        logits_processor=LogitsProcessorList(
            sampling_processors(settings.temperature, settings.top_p, settings.top_k, settings.seed)
        ),
        stopping_criteria=StoppingCriteriaList(
            [ChoiceTracker([assembler], on_step=show, prompt_length=input_ids.shape[1])]
        ),
        **settings.speculation,
    )
    assembler.finish()
    show()
    out.write("\n")
    kept = assembler.token_count  # a drafted step may run past the stop: those tokens are not the reply's
    session.crop(input_ids.shape[1] + kept)  # a positive count keeps that many
    conversation.add_reply(assembler.text, output[0, input_ids.shape[1] :][:kept].tolist(), assembler.overflow)


def converse(
    model: DistributedModelForCausalLM, tokenizer: PreTrainedTokenizerBase, settings: ChatSettings, system: str | None
) -> bool:
    """One conversation in one session; True when the user asked for a new one (/reset)."""
    conversation = Conversation(tokenizer, system)
    with model.inference_session(max_length=settings.max_length) as session:
        while True:
            try:
                line = input(PROMPT).strip()
            except EOFError:
                print()
                return False
            if line in ("/quit", "/exit"):
                return False
            if line == "/reset":
                print("(new conversation)")
                return True
            if not line:
                continue
            conversation.add_user(line)
            try:
                reply(model, conversation, session, settings, sys.stdout)
            except KeyboardInterrupt:
                print("\n(interrupted: the session may hold part of that turn, so the conversation starts over)")
                return True


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    model, tokenizer = open_model(settings)
    draft = load_draft_model(args.draft_model, tokenizer, args.speculate) if args.draft_model else None
    settings = ChatSettings(
        max_new_tokens=args.max_new_tokens,
        max_length=min(args.max_length, model.config.max_position_embeddings),
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        speculation=speculation_kwargs(args.speculate, draft),
    )
    print(HELP)
    try:
        while converse(model, tokenizer, settings, args.system):
            pass
    finally:
        model.close()
    return 0
