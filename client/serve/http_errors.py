"""Every error the gateway answers, in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: its own
refusals (`errors.py`), the swarm's failures, and the framework's (malformed JSON, unknown routes, wrong methods,
bodies over `--max-body-bytes`). `ErrorDetail` strips peer addresses from every message (`redact_addresses`);
the full error goes to the log for the operator."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from swarm.client.serve.errors import GatewayError, RequestTooLargeError
from swarm.client.serve.openai_types import ErrorDetail, ErrorResponse
from swarm.errors import MissingLayersError, RegistryUnavailableError, SwarmError, SwarmFullError

log = logging.getLogger(__name__)

SWARM_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (SwarmFullError, 429, "swarm_full"),
    (MissingLayersError, 503, "missing_layers"),
    (RegistryUnavailableError, 503, "registry_unavailable"),
    (SwarmError, 502, "swarm_error"),
    (Exception, 500, "internal_error"),
)
HTTP_CODES = {
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", RequestTooLargeError.code),
}
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 502, 503)}


def describe(exc: Exception) -> tuple[int, ErrorResponse, dict[str, str]]:
    """Status, body and headers for any exception a request ended with."""
    if isinstance(exc, GatewayError):
        detail = ErrorDetail(message=str(exc), type=exc.kind, param=exc.param, code=exc.code or str(exc.status))
        return exc.status, ErrorResponse(error=detail), exc.headers
    status, kind = next((s, k) for t, s, k in SWARM_ERRORS if isinstance(exc, t))
    if status >= 500:
        log.warning("request failed with %d: %s", status, exc)  # the operator sees the peer the client does not
    return status, ErrorResponse(error=ErrorDetail(message=str(exc), type=kind, code=str(status))), {}


def error_response(exc: Exception) -> JSONResponse:
    status, body, headers = describe(exc)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def error_event(exc: Exception) -> str:
    """An error after a stream has started can only travel inside it, as OpenAI sends it."""
    return f"data: {describe(exc)[1].model_dump_json()}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        broken = [error.get("ctx", {}).get("error", "") for error in errors if error["type"] == "json_invalid"]
        if broken:
            message = f"the request body is not valid JSON: {broken[0]}"
            return _shaped(400, "invalid_request_error", message, "invalid_json")
        problems, params = [], []
        for error in errors:
            where = ".".join(str(part) for part in error["loc"] if part != "body")
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
            params.append(where)
        # 422: the body breaks the schema; 400: it fits, but its fields contradict each other (a model validator)
        status = 400 if all(e["loc"] == ("body",) and e["type"] == "value_error" for e in errors) else 422
        return _shaped(status, "invalid_request_error", "; ".join(problems), str(status), param=params[0] or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind, code = HTTP_CODES.get(exc.status_code, ("invalid_request_error", str(exc.status_code)))
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for this gateway's API"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not take {request.method}; see /docs for this gateway's API"
        return _shaped(exc.status_code, kind, message, code, headers=exc.headers)

    for exception_type in (GatewayError, *(kind for kind, _, _ in SWARM_ERRORS)):
        app.add_exception_handler(exception_type, lambda _, exc: error_response(exc))


def _shaped(
    status: int,
    kind: str,
    message: str,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodySizeLimit:
    """ASGI middleware refusing request bodies over `max_bytes` with 413: at once when `Content-Length` says so,
    else as soon as the bytes received pass the limit (chunked uploads), before anything parses them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(self._too_large())(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, str(self._too_large()))  # FastAPI passes HTTPExceptions through
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"the request body is larger than this gateway's limit of {self.max_bytes} bytes (--max-body-bytes); "
            "send fewer or shorter prompts per request"
        )
