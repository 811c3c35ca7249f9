"""Errors in a request to the OpenAI-compatible gateway (or a batch file's line): answered as HTTP 4xx, never
sent to a peer."""

from __future__ import annotations

from swarm.errors import SwarmError


class InvalidRequestError(SwarmError, ValueError):
    """A generation request asks for something this model cannot do (a prompt longer than its context, a token
    outside its vocabulary); the message names the limit."""


class UnknownModelError(SwarmError):
    """A request names a model this gateway does not serve; the message lists the one it does."""
