"""Results of `CompletionEngine` as OpenAI response objects: whole responses and streamed chunks, for
completions and chat completions, with logprobs in each API's own shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from swarm.client.serve.completions import Choice, ChoiceDelta, GenerationJob, JobResult
from swarm.client.serve.decoding import TokenEntry
from swarm.client.serve.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)


@dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one response repeats."""

    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def completion_logprobs(entries: Sequence[TokenEntry], offset_base: int) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[entry.text for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[dict(entry.top) if entry.logprob is not None else None for entry in entries],
        text_offset=[offset_base + entry.offset for entry in entries],
    )


def chat_logprobs(entries: Sequence[TokenEntry]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=entry.text,
                logprob=entry.logprob if entry.logprob is not None else 0.0,
                bytes=list(entry.text.encode()),
                top_logprobs=[
                    TopLogprob(token=text, logprob=value, bytes=list(text.encode())) for text, value in entry.top
                ],
            )
            for entry in entries
        ]
    )


def completion_response(meta: ResponseMeta, job: GenerationJob, result: JobResult) -> Completion:
    return Completion(
        id=f"cmpl-{meta.id}",
        created=meta.created,
        model=meta.model,
        choices=[_completion_choice(job, choice) for choice in result.choices],
        usage=result.usage,
    )


def _completion_choice(job: GenerationJob, choice: Choice) -> CompletionChoice:
    prompt_text = job.prompt_texts[choice.prompt_index]
    logprobs = None
    if job.logprobs is not None:
        prompt = completion_logprobs(choice.prompt_entries, 0)
        generated = completion_logprobs(choice.assembler.entries, len(prompt_text))
        logprobs = CompletionLogprobs(
            tokens=prompt.tokens + generated.tokens,
            token_logprobs=prompt.token_logprobs + generated.token_logprobs,
            top_logprobs=prompt.top_logprobs + generated.top_logprobs,
            text_offset=prompt.text_offset + generated.text_offset,
        )
    return CompletionChoice(
        text=(prompt_text if job.echo else "") + choice.assembler.text,
        index=choice.index,
        logprobs=logprobs,
        finish_reason=choice.assembler.finish_reason,  # type: ignore[arg-type]
    )


def completion_chunk(meta: ResponseMeta, job: GenerationJob, deltas: Sequence[ChoiceDelta]) -> Completion | None:
    """The chunk for one step, or None when no choice has anything new."""
    choices = [
        CompletionChoice(
            text=delta.text,
            index=delta.index,
            logprobs=completion_logprobs(delta.entries, delta.offset_base) if job.logprobs is not None else None,
            finish_reason=delta.finish_reason,  # type: ignore[arg-type]
        )
        for delta in deltas
        if delta.text or delta.entries or delta.finish_reason
    ]
    return (
        Completion(id=f"cmpl-{meta.id}", created=meta.created, model=meta.model, choices=choices) if choices else None
    )


def completion_usage_chunk(meta: ResponseMeta, usage: Usage) -> Completion:
    return Completion(id=f"cmpl-{meta.id}", created=meta.created, model=meta.model, choices=[], usage=usage)


def chat_response(meta: ResponseMeta, job: GenerationJob, result: JobResult) -> ChatCompletion:
    return ChatCompletion(
        id=f"chatcmpl-{meta.id}",
        created=meta.created,
        model=meta.model,
        choices=[
            ChatChoice(
                index=choice.index,
                message=AssistantMessage(content=choice.assembler.text),
                logprobs=chat_logprobs(choice.assembler.entries) if job.logprobs is not None else None,
                finish_reason=choice.assembler.finish_reason,  # type: ignore[arg-type]
            )
            for choice in result.choices
        ],
        usage=result.usage,
    )


def chat_role_chunk(meta: ResponseMeta, job: GenerationJob) -> ChatCompletionChunk:
    """The first chunk of a chat stream announces the assistant role for every choice."""
    choices = [
        ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
        for index in range(len(job.prompts) * job.n)
    ]
    return ChatCompletionChunk(id=f"chatcmpl-{meta.id}", created=meta.created, model=meta.model, choices=choices)


def chat_chunk(meta: ResponseMeta, job: GenerationJob, deltas: Sequence[ChoiceDelta]) -> ChatCompletionChunk | None:
    choices = [
        ChatChunkChoice(
            index=delta.index,
            delta=ChatDelta(content=delta.text) if delta.text else ChatDelta(),
            logprobs=chat_logprobs(delta.entries) if job.logprobs is not None else None,
            finish_reason=delta.finish_reason,  # type: ignore[arg-type]
        )
        for delta in deltas
        if delta.text or delta.entries or delta.finish_reason
    ]
    if not choices:
        return None
    return ChatCompletionChunk(id=f"chatcmpl-{meta.id}", created=meta.created, model=meta.model, choices=choices)


def chat_usage_chunk(meta: ResponseMeta, usage: Usage) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=f"chatcmpl-{meta.id}", created=meta.created, model=meta.model, choices=[], usage=usage
    )
