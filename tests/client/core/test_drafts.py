"""Where speculative decoding's drafts come from, and which draft models the client accepts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from swarm.client.core.drafts import DEFAULT_DRAFT, DEFAULT_DRAFT_TOKENS, load_draft_model, speculation_kwargs
from swarm.default_model import default_draft_path, default_model_path
from swarm.errors import CheckpointError


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_path())


def test_the_shipped_draft_loads_for_the_embedded_model_drafting_the_count_asked(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    draft = load_draft_model(DEFAULT_DRAFT, tokenizer, 4)
    assert draft.config.vocab_size == len(tokenizer)
    assert draft.num_parameters() < 1_000_000  # far smaller than the 1.6M-parameter model it drafts for
    assert draft.generation_config.num_assistant_tokens == 4
    assert draft.generation_config.num_assistant_tokens_schedule == "constant"  # no count carried between calls
    assert load_draft_model(default_draft_path(), tokenizer).generation_config.num_assistant_tokens == (
        DEFAULT_DRAFT_TOKENS
    )


def test_the_loader_is_part_of_the_client_api() -> None:
    from swarm.client import load_draft_model as exported

    assert exported is load_draft_model


def test_drafts_come_from_the_draft_model_else_from_prompt_lookup(tokenizer: PreTrainedTokenizerBase) -> None:
    draft = load_draft_model(DEFAULT_DRAFT, tokenizer)
    assert speculation_kwargs(8, None) == {"prompt_lookup_num_tokens": 8}
    assert speculation_kwargs(0, None) == speculation_kwargs(None, None) == {}
    assert speculation_kwargs(None, draft) == {"assistant_model": draft}


def test_a_draft_model_with_another_tokenizer_is_refused(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The same number of tokens is not enough: one token with another id means other text for that draft."""
    other = tmp_path / "other-draft"
    shutil.copytree(default_draft_path(), other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="another tokenizer"):
        load_draft_model(other, tokenizer)


def test_a_folder_without_a_checkpoint_is_refused(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_draft_model(tmp_path, tokenizer)
