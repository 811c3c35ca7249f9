"""`swarm-client serve`: an HTTP gateway that speaks OpenAI's completions and chat completions API (and the
GPT-API style `POST /generate`) for one model served by the swarm.

A request is checked against its API key's limits (`admission.py`), then waits for one of `--max-concurrency`
slots, shared round-robin between keys. In its slot it is tokenized and generated in a worker thread, so the
event loop keeps answering others, each request on its own swarm session; one `DistributedModelForCausalLM`
serves them all, and the engine's `DecodeScheduler` advances concurrent requests together (batched on the client
and on the nodes). Streaming responses are server-sent events fed step by step. Errors are JSON shaped like
OpenAI's (`http_errors.py`), with status codes a client can act on: 400/422 invalid request, 401 wrong key,
404 unknown model or route, 413 body too large, 429 over a key's limit or swarm full, 503 layers missing.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Protocol, TypeVar

import anyio
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from swarm.client.core.settings import ClientSettings
from swarm.client.serve.admission import Admission, KeyLimits, Ticket
from swarm.client.serve.completions import ChoiceDelta, CompletionEngine, DeltaSink, GenerationJob, JobResult
from swarm.client.serve.generate_api import GenerateRequest, GenerateResponse, generate_job, run_generate
from swarm.client.serve.http_errors import ERROR_RESPONSES, BodySizeLimit, error_event, install_error_handlers
from swarm.client.serve.openai_format import (
    ResponseMeta,
    chat_chunk,
    chat_response,
    chat_role_chunk,
    chat_usage_chunk,
    completion_chunk,
    completion_response,
    completion_usage_chunk,
)
from swarm.client.serve.openai_types import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
)
from swarm.client.serve.settings import GatewaySettings

Event = list[ChoiceDelta] | JobResult
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "One chunk as JSON, or `[DONE]` after the last."}},
}
STREAMED = {
    200: {
        "description": "The result; with `stream`, server-sent events.",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    }
}
"""Streaming responses are server-sent events: `data: {chunk JSON}` lines, then `data: [DONE]`."""
ANONYMOUS = "anonymous"
"""The one key every request counts against when the gateway has no API keys."""


class Budgeted(Protocol):
    @property
    def token_budget(self) -> int: ...


JobT = TypeVar("JobT", bound=Budgeted)


def create_app(engine: CompletionEngine, settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings if settings is not None else GatewaySettings()
    app = FastAPI(
        title="swarm gateway",
        description=f"OpenAI-compatible completions for `{engine.name}`, served by a swarm of peers.",
        version="1",
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    limits = KeyLimits(settings.key_max_concurrency, settings.key_requests_per_minute, settings.key_tokens_per_minute)
    admission = Admission(settings.max_concurrency, limits)
    workers = anyio.CapacityLimiter(settings.max_concurrency)
    """Threads for tokenizing and generating: one per slot, so a request in a slot never waits for one."""
    api_key = Depends(api_key_dependency(settings.api_key))

    async def admitted(key: str, prepare: Callable[[], JobT]) -> tuple[Ticket, JobT]:
        """Count the request against its key, wait for a slot, tokenize in a thread, charge its tokens."""
        ticket = admission.enter(key)
        try:
            await ticket.slot()
            job = await anyio.to_thread.run_sync(prepare, limiter=workers)
            ticket.charge(job.token_budget)
        except BaseException:
            ticket.close()
            raise
        return ticket, job

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models(_: str = api_key) -> ModelList:
        return ModelList(
            data=[ModelCard(id=name, created=0, max_model_len=engine.context_length) for name in engine.served]
        )

    @app.post("/v1/completions", responses=ERROR_RESPONSES | STREAMED, response_model=Completion)
    async def completions(request: CompletionRequest, key: str = api_key) -> Completion | StreamingResponse:
        ticket, job = await admitted(key, partial(engine.completion_job, request))
        meta = ResponseMeta(job.model)
        formats = Formats(
            whole=lambda result: completion_response(meta, job, result),
            chunk=lambda deltas: completion_chunk(meta, job, deltas),
            usage=lambda usage: completion_usage_chunk(meta, usage),
        )
        return await _answer(engine, job, ticket, workers, request, formats)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES | STREAMED, response_model=ChatCompletion)
    async def chat_completions(
        request: ChatCompletionRequest, key: str = api_key
    ) -> ChatCompletion | StreamingResponse:
        ticket, job = await admitted(key, partial(engine.chat_job, request))
        meta = ResponseMeta(job.model)
        formats = Formats(
            whole=lambda result: chat_response(meta, job, result),
            chunk=lambda deltas: chat_chunk(meta, job, deltas),
            usage=lambda usage: chat_usage_chunk(meta, usage),
            opening=[chat_role_chunk(meta, job)],
        )
        return await _answer(engine, job, ticket, workers, request, formats)

    @app.post("/generate", responses=ERROR_RESPONSES)
    async def generate(request: GenerateRequest, key: str = api_key) -> GenerateResponse:
        ticket, job = await admitted(key, partial(generate_job, engine, request))
        try:
            return await anyio.to_thread.run_sync(run_generate, engine, job, limiter=workers)
        finally:
            ticket.close()

    app.openapi = partial(_openapi_with_context, app, engine.context_length)  # type: ignore[method-assign]
    return app


LENGTH_FIELDS = {
    "CompletionRequest": ("max_tokens",),
    "ChatCompletionRequest": ("max_tokens", "max_completion_tokens"),
    "GenerateRequest": ("max_length",),
}


def _openapi_with_context(app: FastAPI, context_length: int) -> dict[str, object]:
    """The OpenAPI schema, with this model's context as the bound of every length field: more never fits."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for model, names in LENGTH_FIELDS.items():
            properties = schema["components"]["schemas"][model]["properties"]
            for name in names:
                for variant in properties[name].get("anyOf", [properties[name]]):
                    if variant.get("type") == "integer":
                        variant["maximum"] = context_length
    return app.openapi_schema


@dataclass(frozen=True)
class Formats:
    """How one API shapes a result: whole, as stream chunks (None: nothing new), and the closing usage chunk."""

    whole: Callable[[JobResult], BaseModel]
    chunk: Callable[[list[ChoiceDelta]], BaseModel | None]
    usage: Callable[[Usage], BaseModel]
    opening: list[BaseModel] = field(default_factory=list)


async def _answer(
    engine: CompletionEngine,
    job: GenerationJob,
    ticket: Ticket,
    workers: anyio.CapacityLimiter,
    request: SamplingRequest,
    formats: Formats,
) -> BaseModel | StreamingResponse:
    """Generate `job` whole or as a stream; the ticket is given back when the worker thread ends."""
    if not request.stream:
        try:
            result = await anyio.to_thread.run_sync(engine.run, job, limiter=workers)
            ticket.settle(result.usage.total_tokens)
        finally:
            ticket.close()
        return formats.whole(result)
    with_usage = request.stream_options is not None and request.stream_options.include_usage
    events = _run_streaming(engine, job, ticket, workers)
    try:
        first = await anext(events)  # an early failure (missing layers, swarm full) is still a plain HTTP error
    except BaseException:
        await events.aclose()  # the client left or it failed: stop generating
        raise

    async def body() -> AsyncIterator[str]:
        try:
            for chunk in formats.opening:
                yield _sse(chunk)
            async for event in _prepend(first, events):
                for chunk in _event_chunks(event, formats, with_usage):
                    yield _sse(chunk)
        except Exception as exc:  # the status line is sent already: report inside the stream
            yield error_event(exc)
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event_chunks(event: Event, formats: Formats, with_usage: bool) -> list[BaseModel]:
    if isinstance(event, JobResult):
        return [formats.usage(event.usage)] if with_usage else []
    chunk = formats.chunk(event)
    return [chunk] if chunk is not None else []


async def _run_streaming(
    engine: CompletionEngine, job: GenerationJob, ticket: Ticket, workers: anyio.CapacityLimiter
) -> AsyncIterator[Event]:
    """Run `job` in a worker thread; yield its deltas as they come, then its result (or raise its error).
    Closing the iterator early (the client left) stops generation at the next step; the ticket is given back
    when the thread has ended, whoever is still listening."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[list[ChoiceDelta] | None] = asyncio.Queue()
    cancel = threading.Event()
    sink: DeltaSink = lambda deltas: loop.call_soon_threadsafe(queue.put_nowait, deltas)  # noqa: E731
    task = asyncio.ensure_future(anyio.to_thread.run_sync(engine.run, job, sink, cancel, limiter=workers))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    task.add_done_callback(partial(_finished, ticket))
    try:
        while (deltas := await queue.get()) is not None:
            yield deltas
        yield await task
    finally:
        cancel.set()


def _finished(ticket: Ticket, task: asyncio.Future[JobResult]) -> None:
    if not task.cancelled() and task.exception() is None:  # reading the exception marks it seen
        ticket.settle(task.result().usage.total_tokens)
    ticket.close()


async def _prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for event in rest:
        yield event


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


BEARER = HTTPBearer(auto_error=False, description="One of the gateway's --api-key values.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
"""Only routes that depend on it declare Bearer authentication in the OpenAPI schema."""


def api_key_dependency(keys: list[str]) -> Callable[..., Awaitable[str]]:
    """The dependency naming the key a request counts against. Without keys every request is `ANONYMOUS` and the
    schema declares no authentication; with keys, `Authorization: Bearer KEY` must carry one of them."""
    if not keys:

        async def anonymous() -> str:
            return ANONYMOUS

        return anonymous
    encoded = [key.encode() for key in keys]

    async def authorized(credentials: Credentials) -> str:
        given = credentials.credentials.encode() if credentials is not None else b""
        matches = [secrets.compare_digest(given, key) for key in encoded]  # every key compared: no timing hint
        if not any(matches):
            raise HTTPException(
                status_code=401,
                detail="invalid API key: send one of the gateway's --api-key values as `Authorization: Bearer KEY`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return f"key-{matches.index(True)}"

    return authorized


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    import uvicorn

    from swarm.client.cli.resolve import open_model
    from swarm.client.core.drafts import load_draft_model

    gateway = GatewaySettings.from_flags(args)
    model, tokenizer = open_model(settings)
    draft = load_draft_model(gateway.draft_model, tokenizer, gateway.speculate) if gateway.draft_model else None
    engine = CompletionEngine(
        model,
        tokenizer,
        model.planner.model_name,
        max_rows=gateway.max_batch_rows,
        speculate=gateway.speculate,
        draft=draft,
    )
    for label, path in gateway.tunings().items():
        name = engine.add_tuning(label, model.read_tuning(path))
        print(f"serving {path} as model {name!r}", file=sys.stderr)
    app = create_app(engine, gateway)
    print(
        f"swarm gateway for {engine.name}: http://{gateway.host}:{gateway.port}/v1 (API docs at /docs)", file=sys.stderr
    )
    try:
        uvicorn.run(app, host=gateway.host, port=gateway.port, log_level=settings.log_level.lower())
    finally:
        engine.close()
        model.close()
    return 0
