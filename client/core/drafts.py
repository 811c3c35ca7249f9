"""Where speculative decoding's drafts come from: the text so far (prompt lookup) or a small local draft model.

A draft only decides how many tokens one step through the swarm may settle, never which: the swarm checks every
drafted token (greedy keeps plain decoding's tokens, sampling the target's distribution). So a draft model may
run on transformers' own modeling code: a release that broke it would cost speed, not correctness, and the
oracle tests measure its agreement on both ends of the declared range.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swarm.client.core.transformers_compat import merge_draft_generate_arguments
from swarm.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_DRAFT = "default"
"""`--draft-model default`: the draft distilled from the embedded demo model, shipped beside it."""

DEFAULT_DRAFT_TOKENS = 8
"""Drafted tokens a step when a draft model is given without `--speculate N`."""


def draft_model_path(spec: str | Path) -> Path:
    """`default` names the embedded demo model's draft; anything else is a checkpoint folder."""
    if str(spec) == DEFAULT_DRAFT:
        from swarm.default_model import default_draft_path

        return default_draft_path()
    return Path(spec)


def load_draft_model(
    spec: str | Path, tokenizer: PreTrainedTokenizerBase, tokens: int | None = None
) -> PreTrainedModel:
    """The draft checkpoint, in float32 on the CPU, drafting `tokens` a step (default `DEFAULT_DRAFT_TOKENS`),
    once its vocabulary is known to be `tokenizer`'s (the target model's): drafts are token ids, which mean the same
    text only under the same tokenizer.

    transformers reads how many tokens to draft from the draft model's own generation config, so it is set there,
    with a constant schedule: transformers' default would carry a count learned by one request into the next."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = draft_model_path(spec)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"draft model {str(spec)!r}: no config.json in {path}")
    draft_vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    target_vocab = tokenizer.get_vocab()
    if draft_vocab != target_vocab:
        raise CheckpointError(
            f"draft model {path.name!r} has another tokenizer than the model's ({len(draft_vocab)} vs "
            f"{len(target_vocab)} tokens, or the same count with other ids); a draft model must share it"
        )
    draft = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    draft.generation_config.num_assistant_tokens = tokens or DEFAULT_DRAFT_TOKENS
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    merge_draft_generate_arguments(draft)
    return draft


def speculation_kwargs(tokens: int | None, draft: PreTrainedModel | None) -> dict[str, object]:
    """`generate()` arguments that draft up to `tokens` a step: with `draft` when given (its count was set by
    `load_draft_model`), else by prompt lookup; none when `tokens` is 0 or unset and there is no draft."""
    if draft is None:
        return {"prompt_lookup_num_tokens": tokens} if tokens else {}
    return {"assistant_model": draft}
