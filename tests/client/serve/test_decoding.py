"""Generated tokens become text the way OpenAI-style APIs report it: per-token pieces that add up to the text,
stop sequences cut (and never half-streamed), end of sequence, characters split across byte tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from swarm.client.serve.decoding import ChoiceTracker, StepLogprobs, TextAssembler
from swarm.default_model import default_model_path

EOS = 2


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_path())


def assemble(
    tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: list[int], **kwargs: object
) -> TextAssembler:
    assembler = TextAssembler(tokenizer, tokenizer(prompt).input_ids, eos_ids=[EOS], **kwargs)
    for token in continuation:
        assembler.add(token)
    assembler.finish()
    return assembler


def test_token_pieces_add_up_to_the_decoded_text(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer(" and a dragon 🐉 flew over the café", add_special_tokens=False).input_ids
    assembler = assemble(tokenizer, "Once upon a time", ids)
    assert assembler.text == tokenizer.decode(ids)
    assert "".join(entry.text for entry in assembler.entries) == assembler.text
    assert [entry.offset for entry in assembler.entries] == sorted(entry.offset for entry in assembler.entries)
    assert "" in [entry.text for entry in assembler.entries], "bytes of the emoji wait for the whole character"
    assert assembler.finish_reason == "length" and assembler.token_count == len(ids)


def test_a_character_cut_off_by_the_length_limit_is_flushed_like_decode(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer(" 🐉", add_special_tokens=False).input_ids[:-1]
    assert assemble(tokenizer, "A", ids).text == tokenizer.decode(ids)


def test_end_of_sequence_stops_and_is_not_text(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer(" the end", add_special_tokens=False).input_ids
    assembler = assemble(tokenizer, "This is", [*ids, EOS, 0, 0])
    assert assembler.text == " the end" and assembler.finish_reason == "stop" and assembler.overflow == "</s>"
    assert assembler.token_count == len(ids) + 1


def test_stop_sequence_cuts_the_text_and_its_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer(" the cat sat on the mat", add_special_tokens=False).input_ids
    assembler = assemble(tokenizer, "Look:", ids, stop=["sat", "zzz"])
    assert assembler.text == " the cat " and assembler.finish_reason == "stop"
    assert assembler.overflow.startswith("sat")
    assert "".join(entry.text for entry in assembler.entries) == " the cat "


def test_streaming_never_releases_the_start_of_a_stop_sequence(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer(" one two\nUser: three", add_special_tokens=False).input_ids
    assembler = TextAssembler(tokenizer, [1], stop=["\nUser:"])
    released = []
    for token in ids:
        assembler.add(token)
        released.append(assembler.take()[0])
        assert "\n" not in "".join(released)
    assembler.finish()
    released.append(assembler.take()[0])
    assert "".join(released) == assembler.text == " one two"


def test_alternatives_are_decoded_in_context(tokenizer: PreTrainedTokenizerBase) -> None:
    upon, a = tokenizer(" upon a", add_special_tokens=False).input_ids
    assembler = TextAssembler(tokenizer, tokenizer("Once").input_ids)
    assembler.add(upon, -0.5, [(upon, -0.5), (a, -2.0)])
    assert assembler.entries[0].top == ((" upon", -0.5), (" a", -2.0))


def test_tracker_feeds_each_row_and_stops_finished_ones(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [TextAssembler(tokenizer, [1], eos_ids=[EOS]), TextAssembler(tokenizer, [1], eos_ids=[EOS])]
    recorder = StepLogprobs()
    logits = torch.zeros(2, len(tokenizer))
    recorder(torch.tensor([[1], [1]]), logits)
    tracker = ChoiceTracker(rows, recorder, alternatives=1)
    done = tracker(torch.tensor([[1, 300], [1, EOS]]), logits)
    assert done.tolist() == [False, True]
    assert rows[0].entries[0].logprob == pytest.approx(-torch.log(torch.tensor(float(len(tokenizer)))).item())
    assert len(rows[0].entries[0].top) == 1
