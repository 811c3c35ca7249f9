"""Every exception swarm raises, in one place, each with a message that says what to do next."""

from __future__ import annotations

from collections.abc import Sequence


class SwarmError(Exception):
    """Base class: catch this to handle any swarm failure."""


class ProtocolError(SwarmError):
    """A frame broke the wire contract; `code` is one of `protocol.ERROR_CODES`. `step_id`: the step the
    refused frame carried, when it could be read, so that the error frame can name it."""

    def __init__(self, code: str, message: str, step_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.step_id = step_id


class RemoteError(ProtocolError):
    """A peer answered with an error frame."""

    def __init__(self, code: str, message: str, peer: str = "") -> None:
        super().__init__(code, f"{message} (from {peer})" if peer else message)
        self.peer = peer


class PeerUnreachableError(SwarmError):
    """A peer could not be reached or dropped the connection."""


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


class InvalidRequestError(SwarmError, ValueError):
    """A generation request asks for something this model cannot do (a prompt longer than its context, a token
    outside its vocabulary); the message names the limit."""


class UnknownModelError(SwarmError):
    """A request names a model this gateway does not serve; the message lists the one it does."""


def format_layer_range(start: int, end: int) -> str:
    """Half-open [start, end) as the inclusive form users type on the command line ("4-7")."""
    return f"{start}-{end - 1}" if end - start > 1 else f"{start}"
