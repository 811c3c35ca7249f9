"""Errors in a request to the OpenAI-compatible gateway (or a batch file's line): answered as HTTP 4xx in OpenAI's
error shape, never sent to a peer. Each carries what that shape needs: status, `type`, `code` and `param`.

`redact_addresses` keeps peers' addresses out of every message a client sees: a swarm error names the node that
failed, which helps its operator, not the gateway's users (and tells them where the nodes are)."""

from __future__ import annotations

import math
import re

from swarm.errors import SwarmError


class GatewayError(SwarmError):
    """A request the gateway refuses; `status`, `kind` (OpenAI's `type`) and `code` say why to a program."""

    status = 400
    kind = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequestError(GatewayError, ValueError):
    """A generation request asks for something this model cannot do (a prompt longer than its context, a token
    outside its vocabulary); the message names the limit."""


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus the tokens asked for do not fit the model's context (OpenAI's `context_length_exceeded`)."""

    code = "context_length_exceeded"


class UnknownModelError(GatewayError):
    """A request names a model this gateway does not serve; the message lists the one it does."""

    status = 404
    kind = "invalid_request_error"
    code = "model_not_found"


class RequestTooLargeError(GatewayError):
    """The request body is larger than `--max-body-bytes`; refused before it is read further."""

    status = 413
    code = "request_too_large"


class RateLimitError(GatewayError):
    """An API key is over one of its limits; `retry_after` seconds from now it may try again."""

    status = 429
    kind = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


_ADDRESS = re.compile(
    r"""
    \b[a-z][a-z0-9+.-]*://[^\s'"<>),]+              # any URL: ws://host:port, wss://..., http://...
    | \[[0-9a-f:.]+\](?::\d{1,5})?                  # [IPv6]:port
    | \b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b       # IPv4, with or without a port
    | \b(?:localhost|[a-z0-9-]+(?:\.[a-z0-9-]+)+):\d{1,5}\b   # host.name:port
    """,
    re.IGNORECASE | re.VERBOSE,
)


def redact_addresses(message: str) -> str:
    """`message` with every URL, IP address and host:port replaced by "a peer"."""
    return _ADDRESS.sub("a peer", message)
