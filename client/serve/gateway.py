"""`swarm-client serve`: an HTTP gateway that speaks OpenAI's completions and chat completions API (and the
GPT-API style `POST /generate`) for one model served by the swarm.

Decoding blocks, so every request runs in a worker thread (at most `--max-concurrency` at once), each on its
own swarm session; one `DistributedModelForCausalLM` serves them all, and the engine's `DecodeScheduler`
advances concurrent requests together (batched on the client and on the nodes). Streaming responses are
server-sent events fed step by step. Errors are JSON shaped like OpenAI's, with status codes a client can
act on: 422/400 invalid request, 401 wrong key, 404 unknown model, 429 swarm full, 503 layers missing.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from swarm.client.core.settings import ClientSettings
from swarm.client.serve.completions import ChoiceDelta, CompletionEngine, DeltaSink, GenerationJob, JobResult
from swarm.client.serve.errors import InvalidRequestError, UnknownModelError
from swarm.client.serve.generate_api import GenerateRequest, GenerateResponse, run_generate
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
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
)
from swarm.client.serve.settings import GatewaySettings
from swarm.errors import MissingLayersError, RegistryUnavailableError, SwarmError, SwarmFullError

ERROR_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (InvalidRequestError, 400, "invalid_request_error"),
    (UnknownModelError, 404, "model_not_found"),
    (SwarmFullError, 429, "swarm_full"),
    (MissingLayersError, 503, "missing_layers"),
    (RegistryUnavailableError, 503, "registry_unavailable"),
    (SwarmError, 502, "swarm_error"),
    (Exception, 500, "internal_error"),
)
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 422, 429, 502, 503)}

Event = list[ChoiceDelta] | JobResult


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, code=str(status)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_event(exc: Exception) -> str:
    """An error after a stream has started can only travel inside it, as OpenAI sends it."""
    status, kind = next((s, k) for t, s, k in ERROR_STATUS if isinstance(exc, t))
    return _sse(ErrorResponse(error=ErrorDetail(message=str(exc), type=kind, code=str(status))))


def create_app(engine: CompletionEngine, api_key: str | None = None, max_concurrency: int = 8) -> FastAPI:
    app = FastAPI(
        title="swarm gateway",
        description=f"OpenAI-compatible completions for `{engine.name}`, served by a swarm of peers.",
        version="1",
    )
    limiter = anyio.CapacityLimiter(max_concurrency)
    _install_error_handlers(app)
    guard = [Depends(BearerGuard(api_key))]

    @app.get("/v1/models", dependencies=guard, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=engine.name, created=0, max_model_len=engine.context_length)])

    @app.post("/v1/completions", dependencies=guard, responses=ERROR_RESPONSES, response_model=Completion)
    async def completions(request: CompletionRequest) -> Completion | StreamingResponse:
        job, meta = engine.completion_job(request), ResponseMeta(engine.name)
        formats = Formats(
            whole=lambda result: completion_response(meta, job, result),
            chunk=lambda deltas: completion_chunk(meta, job, deltas),
            usage=lambda usage: completion_usage_chunk(meta, usage),
        )
        return await _answer(engine, job, limiter, request, formats)

    @app.post("/v1/chat/completions", dependencies=guard, responses=ERROR_RESPONSES, response_model=ChatCompletion)
    async def chat_completions(request: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        job, meta = engine.chat_job(request), ResponseMeta(engine.name)
        formats = Formats(
            whole=lambda result: chat_response(meta, job, result),
            chunk=lambda deltas: chat_chunk(meta, job, deltas),
            usage=lambda usage: chat_usage_chunk(meta, usage),
            opening=[chat_role_chunk(meta, job)],
        )
        return await _answer(engine, job, limiter, request, formats)

    @app.post("/generate", dependencies=guard, responses=ERROR_RESPONSES)
    async def generate(request: GenerateRequest) -> GenerateResponse:
        return await anyio.to_thread.run_sync(run_generate, engine, request, limiter=limiter)

    return app


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
    limiter: anyio.CapacityLimiter,
    request: SamplingRequest,
    formats: Formats,
) -> BaseModel | StreamingResponse:
    if not request.stream:
        return formats.whole(await anyio.to_thread.run_sync(engine.run, job, limiter=limiter))
    with_usage = request.stream_options is not None and request.stream_options.include_usage
    events = _run_streaming(engine, job, limiter)
    first = await anext(events)  # an early failure (missing layers, swarm full) is still a plain HTTP error

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
    engine: CompletionEngine, job: GenerationJob, limiter: anyio.CapacityLimiter
) -> AsyncIterator[Event]:
    """Run `job` in a worker thread; yield its deltas as they come, then its result (or raise its error).
    Closing the iterator early (the client left) stops generation at the next step."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[list[ChoiceDelta] | None] = asyncio.Queue()
    cancel = threading.Event()
    sink: DeltaSink = lambda deltas: loop.call_soon_threadsafe(queue.put_nowait, deltas)  # noqa: E731
    task = asyncio.ensure_future(anyio.to_thread.run_sync(engine.run, job, sink, cancel, limiter=limiter))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # read even if nobody awaits it
    try:
        while (deltas := await queue.get()) is not None:
            yield deltas
        yield await task
    finally:
        cancel.set()


async def _prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for event in rest:
        yield event


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


BEARER = HTTPBearer(auto_error=False, description="The gateway's --api-key, when it was started with one.")


class BearerGuard:
    """Refuses requests without `Authorization: Bearer KEY` when the gateway has an API key."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    async def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if self.api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), self.api_key.encode()):
            raise HTTPException(
                status_code=401,
                detail="invalid API key: send the gateway's --api-key as `Authorization: Bearer KEY`",
                headers={"WWW-Authenticate": "Bearer"},
            )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"] if part != "body")
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        return error_response(422, "invalid_request_error", "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(
            exc.status_code, "authentication_error" if exc.status_code == 401 else "error", str(exc.detail), exc.headers
        )

    for exception_type, status, kind in ERROR_STATUS:

        async def swarm_error(_: Request, exc: Exception, status: int = status, kind: str = kind) -> JSONResponse:
            return error_response(status, kind, str(exc))

        app.add_exception_handler(exception_type, swarm_error)


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    import uvicorn

    from swarm.client.cli.resolve import open_model

    model, tokenizer = open_model(settings)
    engine = CompletionEngine(model, tokenizer, model.planner.model_name)
    gateway = GatewaySettings.from_flags(args)
    app = create_app(engine, gateway.api_key, gateway.max_concurrency)
    print(
        f"swarm gateway for {engine.name}: http://{gateway.host}:{gateway.port}/v1 (API docs at /docs)", file=sys.stderr
    )
    try:
        uvicorn.run(app, host=gateway.host, port=gateway.port, log_level=settings.log_level.lower())
    finally:
        engine.close()
        model.close()
    return 0
