"""Every exception swarm's shared core, nodes and clients raise, each with a message that says what to do next.

    SwarmError                        catch this to handle any swarm failure
    ├── ProtocolError                 a frame broke the wire contract (this process found it; a node answers
    │                                 it with an `error` frame of its `code`)
    ├── RemoteError                   a peer answered with an `error` frame: `code`, `peer`, `retryable`
    ├── PeerUnreachableError          a peer could not be reached or dropped the connection
    ├── PeerLiedError                 a peer's answer was contradicted by two others (span verification)
    ├── RegistryUnavailableError      no registry answered
    ├── MissingLayersError            no live peer serves some layers of a model
    ├── SwarmFullError                every peer that could serve some layers refused: its cache is full
    ├── CheckpointError               a checkpoint folder is missing, incomplete or unreadable
    ├── UnsupportedModelError         no adapter in `swarm.models` for the checkpoint's `model_type`
    └── IncompatibleTransformersError the installed `transformers` does something swarm does not know

The OpenAI-compatible gateway adds its request errors in `swarm.client.serve.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class ErrorCode(StrEnum):
    """The `code` of an `error` frame. `retryable`: another peer may well succeed where this one failed, so a
    client fails over instead of giving up."""

    BAD_REQUEST = "bad_request"
    """The frame is malformed or asks for something the protocol does not allow; it would fail anywhere."""
    UNSUPPORTED_VERSION = "unsupported_version"
    """`hello` named a protocol version this peer does not speak; the message lists those it does."""
    UNAUTHORIZED = "unauthorized"
    """Missing or wrong swarm token."""
    TOO_LARGE = "too_large"
    """The frame exceeds the peer's size limit."""
    UNKNOWN_SESSION = "unknown_session"
    """No such session on this connection (the peer restarted, or the session ended)."""
    BUSY = "busy"
    """The peer is full or draining."""
    INTERNAL = "internal"
    """The peer failed while computing; the request itself was valid."""
    NOT_OFFERED = "not_offered"
    """The peer does not offer this kind of work (a node started with `--no-training` asked for `backward`)."""

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_SESSION,
        ErrorCode.BUSY,
        ErrorCode.INTERNAL,
        ErrorCode.NOT_OFFERED,
    }
)


class SwarmError(Exception):
    """Base class: catch this to handle any swarm failure."""


class ProtocolError(SwarmError):
    """A frame broke the wire contract. `step_id`: the step the refused frame carried, when it could be read, so
    that the error frame can name it."""

    def __init__(self, code: ErrorCode, message: str, step_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.step_id = step_id


class RemoteError(SwarmError):
    """A peer answered with an error frame."""

    def __init__(self, code: ErrorCode, message: str, peer: str = "") -> None:
        super().__init__(f"{code}: {message} (from {peer})" if peer else f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.peer = peer

    @property
    def retryable(self) -> bool:
        return self.code.retryable


class PeerUnreachableError(SwarmError):
    """A peer could not be reached or dropped the connection."""


class PeerLiedError(SwarmError):
    """A peer answered a step with hidden states two other peers contradicted; its layers fail over."""

    def __init__(self, peer: str) -> None:
        super().__init__(f"{peer} answered with hidden states two other peers contradicted")
        self.peer = peer


class RegistryUnavailableError(SwarmError):
    """No registry answered; the message lists which were tried."""


class MissingLayersError(SwarmError):
    """No live peer serves some layers of a model, so no chain can cover it."""

    def __init__(self, model: str, num_layers: int, missing: Sequence[tuple[int, int]]) -> None:
        self.model = model
        self.num_layers = num_layers
        self.missing = list(missing)
        spans = ", ".join(format_layer_range(a, b) for a, b in self.missing)
        super().__init__(
            f"model {model!r} ({num_layers} layers): no live peer serves layers {spans}. "
            f"Start a node for them, e.g. `swarm-node --model PATH --layers {format_layer_range(*self.missing[0])}`."
        )


class SwarmFullError(SwarmError):
    """Every peer that could serve some layers refused a new session because its cache is full."""


class CheckpointError(SwarmError):
    """A checkpoint folder is missing, incomplete or unreadable."""


class UnsupportedModelError(SwarmError):
    """The checkpoint's `model_type` has no adapter in `swarm.models`."""


class IncompatibleTransformersError(SwarmError):
    """The installed `transformers` release does something swarm does not know (a renamed argument, a moved
    module); the message names the release and what was expected."""


def format_layer_range(start: int, end: int) -> str:
    """Half-open [start, end) as the inclusive form users type on the command line ("4-7")."""
    return f"{start}-{end - 1}" if end - start > 1 else f"{start}"
