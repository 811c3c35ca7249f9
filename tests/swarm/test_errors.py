"""One error hierarchy: what a peer reports is apart from what broke the protocol, and codes say what to retry."""

from __future__ import annotations

import msgpack
import pytest

from swarm.errors import ErrorCode, ProtocolError, RemoteError, SwarmError
from swarm.protocol import Error, decode_message, encode_message


def test_a_peer_reporting_an_error_is_not_a_protocol_violation() -> None:
    busy = RemoteError(ErrorCode.BUSY, "full", "ws://peer")
    assert isinstance(busy, SwarmError) and not isinstance(busy, ProtocolError)
    assert busy.retryable and "ws://peer" in str(busy)


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (ErrorCode.BAD_REQUEST, False),
        (ErrorCode.UNAUTHORIZED, False),
        (ErrorCode.TOO_LARGE, False),
        (ErrorCode.UNSUPPORTED_VERSION, True),
        (ErrorCode.UNKNOWN_SESSION, True),
        (ErrorCode.BUSY, True),
        (ErrorCode.INTERNAL, True),
    ],
)
def test_only_errors_another_peer_may_not_repeat_are_retryable(code: ErrorCode, retryable: bool) -> None:
    assert code.retryable is retryable


def test_every_code_travels_as_its_name_and_comes_back_as_the_enum() -> None:
    for code in ErrorCode:
        frame = decode_message(encode_message(Error(code=code, message="m")))
        assert isinstance(frame, Error) and frame.code is code


def test_an_unknown_code_in_a_frame_is_a_bad_request() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(msgpack.packb({"type": "error", "code": "on_fire", "message": "m"}))
    assert caught.value.code is ErrorCode.BAD_REQUEST
