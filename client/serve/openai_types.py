"""The OpenAI completions and chat completions API as pydantic models: what the gateway and `batch` accept
and return. Bounds live on the fields, so invalid requests fail validation (HTTP 422) before any work, and
the OpenAPI schema at `/openapi.json` documents them. Unknown fields are refused rather than silently ignored,
and types are strict (`json_input.py`). Every numeric bound is one the sampling code works at (a fuzzer checks
it): a seed is an integer JSON carries exactly, and temperatures so small that logits over them would overflow
decode greedily (`sampling.py`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swarm.client.serve.errors import redact_addresses
from swarm.client.serve.json_input import WHOLE, Integer, JsonRequest, null_means_default

MAX_CHOICES = 16
MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 4
MAX_PROMPTS = 64
"""Prompts in one request: a node runs at most 64 sequences of a session by default (see `--max-batch-rows`)."""
MAX_MESSAGES = 1024
MAX_SEED = 2**53 - 1
"""The largest integer every JSON parser reads exactly (beyond it, a seed could change on its way here)."""


TokenIds = Annotated[list[Integer], Field(min_length=1)]
StopText = Annotated[str, Field(min_length=1)]
Prompt = (
    str
    | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class StreamOptions(JsonRequest):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices before [DONE].")


class SamplingRequest(JsonRequest):
    """Fields that completions and chat completions share. JSON `null` means "the default", as in OpenAI's API;
    types are strict (`json_input.py`)."""

    model_config = ConfigDict(json_schema_extra=null_means_default)

    model: str | None = Field(None, description="Model to use; the gateway serves one, listed by GET /v1/models.")
    max_tokens: Annotated[int, Field(ge=0), WHOLE] | None = Field(
        None, description="Most tokens to generate per choice (completions default 16; chat: up to the context)."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 picks the likeliest token.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: sample from this probability mass.")
    n: Integer = Field(1, ge=1, le=MAX_CHOICES, description="Choices to return for each prompt.")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} strings that end a choice; the text excludes them."
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), WHOLE] | None = Field(
        None, description="Makes sampling reproducible for the same request (0 to 2**53 - 1)."
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of every token generated at least once."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Times each token's count so far, subtracted from its logit."
    )
    stream: bool = Field(False, description="Send choices as server-sent events as they are generated.")
    stream_options: StreamOptions | None = Field(None, description="Options for streaming (`include_usage`).")
    user: str | None = Field(None, description="End-user identifier; accepted for compatibility, not used.")

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    """POST /v1/completions, and one line of a `swarm-client batch` input file."""

    prompt: Prompt = Field(
        description="Text to continue: a string, a list of strings (one result set each), or token ids.",
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = Field(
        None, description="Return each token's log-probability and this many alternatives."
    )
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs if asked).")
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES), WHOLE] | None = Field(
        None, description="Generate this many, return the `n` with the best mean logprob."
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _some_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("give at least one prompt")
        if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS and any(isinstance(i, str | list) for i in prompt):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
        return prompt

    @model_validator(mode="after")
    def _check_best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and (self.best_of or self.n) > self.n:
            raise ValueError("best_of cannot be combined with stream")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="The message text, or a list of text parts.")
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="The conversation so far, oldest first."
    )
    max_completion_tokens: Annotated[int, Field(ge=0), WHOLE] | None = Field(
        None, description="Newer name for `max_tokens`."
    )
    logprobs: bool = Field(False, description="Return each generated token's log-probability.")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = Field(
        None, description="Alternatives to return per token (needs `logprobs`)."
    )

    @model_validator(mode="after")
    def _check_top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token, as OpenAI's legacy completions API: text, log-probability, alternatives, character offset."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="None for the first prompt token (nothing precedes it).")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="Where each token starts in prompt + completion text.")


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A completions response, or one streamed chunk of it (then `usage` is null until the end)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "swarm"
    max_model_len: int = Field(description="Context length: prompt plus generated tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    """One error as OpenAI shapes it. The message never names a peer's address, wherever it came from."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None

    @field_validator("message")
    @classmethod
    def _no_addresses(cls, message: str) -> str:
        return redact_addresses(message)


class ErrorResponse(BaseModel):
    """Every error the gateway returns, shaped like OpenAI's so its clients show the message."""

    error: ErrorDetail
