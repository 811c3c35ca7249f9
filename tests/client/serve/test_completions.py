"""`CompletionEngine` on a local model (it only needs `generate()` and a forward): batching, streaming deltas,
best_of, echo logprobs and the limits it enforces. The swarm simulations check the same through real nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.client.serve.completions import Choice, ChoiceDelta, CompletionEngine, GenerationJob
from swarm.client.serve.errors import InvalidRequestError, UnknownModelError
from swarm.client.serve.openai_format import ResponseMeta, completion_response
from swarm.client.serve.openai_types import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> CompletionEngine:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return CompletionEngine(model, AutoTokenizer.from_pretrained(tiny_llama), "tiny")  # type: ignore[arg-type]


def greedy_text(engine: CompletionEngine, prompt: str, max_new: int) -> str:
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    output = engine.model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    new = output[0, ids.shape[1] :].tolist()
    return engine.tokenizer.decode(new[: new.index(2)] if 2 in new else new)


def test_prompts_of_different_lengths_each_get_their_greedy_text(engine: CompletionEngine) -> None:
    prompts = ["Once upon a time", "A"]
    job = engine.completion_job(CompletionRequest(prompt=prompts, max_tokens=6, temperature=0, n=2))
    result = engine.run(job)
    assert [c.assembler.text for c in result.choices] == [greedy_text(engine, p, 6) for p in prompts for _ in "ab"]
    assert [c.index for c in result.choices] == [0, 1, 2, 3]


def test_streamed_deltas_add_up_to_the_result_and_finish_once(engine: CompletionEngine) -> None:
    job = engine.completion_job(CompletionRequest(prompt="The", max_tokens=8, temperature=0.8, seed=1, n=2, echo=True))
    seen: list[ChoiceDelta] = []
    result = engine.run(job, on_delta=seen.extend)
    for choice in result.choices:
        deltas = [d for d in seen if d.index == choice.index]
        assert "".join(d.text for d in deltas) == "The" + choice.assembler.text
        assert [d.finish_reason for d in deltas if d.finish_reason] == [choice.assembler.finish_reason]


def test_best_of_keeps_the_candidates_with_the_best_mean_logprob(engine: CompletionEngine) -> None:
    sampled = dict(prompt="The dog", max_tokens=5, temperature=1.0, seed=4)
    every = engine.run(engine.completion_job(CompletionRequest(**sampled, n=4)))
    best = engine.run(engine.completion_job(CompletionRequest(**sampled, n=2, best_of=4)))

    def mean(choice: Choice) -> float:
        return sum(e.logprob for e in choice.assembler.entries) / len(choice.assembler.entries)

    ranked = sorted(every.choices, key=mean, reverse=True)[:2]
    assert [c.assembler.text for c in best.choices] == [c.assembler.text for c in ranked]
    assert [c.index for c in best.choices] == [0, 1]


def test_echo_logprobs_cover_prompt_and_completion_with_offsets(engine: CompletionEngine) -> None:
    job = engine.completion_job(
        CompletionRequest(prompt="Once upon", max_tokens=3, temperature=0, logprobs=2, echo=True)
    )
    choice = completion_response(ResponseMeta("tiny"), job, engine.run(job)).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and choice.text.startswith("Once upon")
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(0 < len(top) <= 2 for top in logprobs.top_logprobs[1:])


def test_limits_are_invalid_requests(engine: CompletionEngine) -> None:
    with pytest.raises(InvalidRequestError, match="context is 512 tokens") as too_long:
        engine.completion_job(CompletionRequest(prompt="hi " * 300, max_tokens=300))
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.completion_job(CompletionRequest(prompt=[1, 10**6]))
    with pytest.raises(UnknownModelError, match="'tiny'"):
        engine.completion_job(CompletionRequest(prompt="hi", model="other"))


def test_chat_jobs_default_to_the_rest_of_the_context_and_stop_at_the_next_user_line(engine: CompletionEngine) -> None:
    job = engine.chat_job(ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], stop="."))
    assert job.prompt_texts == ["User: Hi\nAssistant:"]
    assert job.max_new_tokens == engine.context_length - len(job.prompts[0])
    assert job.stop == [".", "\nUser:"]


def test_more_sequences_than_a_node_batch_holds_are_refused_before_any_work(engine: CompletionEngine) -> None:
    """5 prompts x best_of 16 is 80 sequences in one swarm session: more rows than a node takes (64)."""
    with pytest.raises(InvalidRequestError, match="80 sequences") as refused:
        engine.completion_job(CompletionRequest(prompt=["a"] * 5, n=2, best_of=16))
    assert refused.value.param == "best_of"
    assert len(engine.completion_job(CompletionRequest(prompt=["a"] * 4, n=16)).prompts) == 4


def test_a_prompt_far_beyond_the_context_is_refused_without_tokenizing_it(
    engine: CompletionEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole prompt was tokenized")

    monkeypatch.setattr(type(engine.tokenizer), "__call__", no_tokenizing)
    with pytest.raises(InvalidRequestError, match="context") as refused:
        engine.completion_job(CompletionRequest(prompt="word " * 500_000, max_tokens=1))
    assert refused.value.code == "context_length_exceeded"


def test_a_vanishing_temperature_decodes_greedily_instead_of_failing(engine: CompletionEngine) -> None:
    job = engine.completion_job(CompletionRequest(prompt="Once upon", max_tokens=6, temperature=1e-80, top_p=0.5))
    assert engine.run(job).choices[0].assembler.text == greedy_text(engine, "Once upon", 6)


def job_of(temperature: float, **fields: object) -> GenerationJob:
    base = dict(prompts=[[1, 2]], prompt_texts=["x"], max_new_tokens=4, n=1, candidates=1, top_p=1.0, seed=None)
    base |= dict(presence_penalty=0.0, frequency_penalty=0.0, stop=[], logprobs=None)
    return GenerationJob(temperature=temperature, **(base | fields))  # type: ignore[arg-type]


def test_greedy_requests_draft_and_sampled_ones_only_with_a_draft_model(engine: CompletionEngine) -> None:
    """Prompt lookup's candidates would be dropped by the seeded sampler (it masks all but its own draw): sampled
    requests keep the batched lane unless a draft model drafts for them; tuned ones draft by prompt lookup."""
    model, tokenizer = engine.model, engine.tokenizer
    lookup = CompletionEngine(model, tokenizer, "tiny", speculate=8)  # type: ignore[arg-type]
    drafted = CompletionEngine(model, tokenizer, "tiny", draft=model)  # type: ignore[arg-type]
    assert lookup._speculates(job_of(0.0), rows=1) and not lookup._speculates(job_of(0.7), rows=1)
    assert drafted._speculates(job_of(0.0), rows=1) and drafted._speculates(job_of(0.7, presence_penalty=0.5), rows=1)
    assert not drafted._speculates(job_of(0.7, tuning=object()), rows=1)
    assert not drafted._speculates(job_of(0.7), rows=2)
    assert not drafted._speculates(job_of(0.0, logprobs=2), rows=1)
    assert not CompletionEngine(model, tokenizer, "tiny")._speculates(job_of(0.0), rows=1)  # type: ignore[arg-type]
