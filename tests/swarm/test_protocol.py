"""The wire contract: what round-trips, and what is refused with which error code."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
import torch
from pydantic import ValidationError

from swarm.errors import ProtocolError
from swarm.protocol import (
    MAX_SESSIONS_PER_STEP,
    PROTOCOL_VERSION,
    Error,
    Forward,
    Hello,
    PeerInfo,
    Step,
    StepResult,
    SwarmView,
    WireTensor,
    decode_message,
    encode_message,
)


def peer(**overrides: object) -> PeerInfo:
    values: dict[str, object] = dict(
        peer_id="p1",
        address="ws://127.0.0.1:1",
        model="m",
        num_layers=8,
        start=0,
        end=4,
        state="online",
        dtype="float32",
        throughput=100.0,
        cache_tokens_free=10,
        cache_tokens_total=10,
    )
    values.update(overrides)
    return PeerInfo(**values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.int8])
def test_tensors_round_trip_bit_exactly(dtype: torch.dtype) -> None:
    tensor = (torch.randn(2, 3, 5) * 10).to(dtype)
    step = Step(
        session_ids=["s"],
        rows=[2],
        step_id=3,
        hidden=WireTensor.from_torch(tensor),
        position_ids=WireTensor.from_torch(torch.arange(3).expand(2, 3)),
    )
    decoded = decode_message(encode_message(step))
    assert isinstance(decoded, Step)
    assert decoded.hidden.to_torch().dtype == dtype
    assert torch.equal(decoded.hidden.to_torch(), tensor)


def test_empty_tensor_round_trips() -> None:
    wire = WireTensor.from_torch(torch.empty(0, 4))
    assert WireTensor(**wire.model_dump()).to_torch().shape == (0, 4)


def test_messages_round_trip_through_msgpack() -> None:
    for message in (Hello(version=PROTOCOL_VERSION, token="t"), Error(code="busy", message="full"), peer()):
        if isinstance(message, PeerInfo):
            continue
        assert decode_message(encode_message(message)) == message


def expect_code(frame: bytes | str, code: str, max_bytes: int | None = None) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_message(frame, max_bytes)
    assert info.value.code == code
    return info.value.message


def test_garbage_is_a_bad_request() -> None:
    expect_code(b"\xc1\xff\x00garbage", "bad_request")
    expect_code("a text frame", "bad_request")
    expect_code(msgpack.packb([1, 2, 3]), "bad_request")
    expect_code(msgpack.packb({"no": "type"}), "bad_request")


def test_unknown_type_and_missing_fields_are_named() -> None:
    assert "launch_missiles" in expect_code(msgpack.packb({"type": "launch_missiles"}), "bad_request")
    message = expect_code(msgpack.packb({"type": "step", "session_ids": ["s"]}), "bad_request")
    assert "step" in message


def test_extra_fields_are_refused() -> None:
    frame = msgpack.packb({"type": "hello", "version": 1, "surprise": True})
    assert "surprise" in expect_code(frame, "bad_request")


def test_tensor_bytes_must_match_shape_and_dtype() -> None:
    hidden = {"dtype": "float32", "shape": [1, 1, 4], "data": b"\x00" * 12}
    frame = msgpack.packb(
        {
            "type": "forward",
            "start": 0,
            "end": 1,
            "hidden": hidden,
            "position_ids": {"dtype": "int64", "shape": [1, 1], "data": b"\x00" * 8},
        }
    )
    assert "16" in expect_code(frame, "bad_request")


def test_unknown_dtype_is_refused() -> None:
    hidden = {"dtype": "float128", "shape": [1], "data": b"\x00" * 16}
    frame = msgpack.packb({"type": "forward_result", "hidden": hidden})
    expect_code(frame, "bad_request")


def test_oversized_frames_are_too_large() -> None:
    frame = encode_message(Error(code="internal", message="x" * 100))
    expect_code(frame, "too_large", max_bytes=len(frame) - 1)
    assert decode_message(frame, max_bytes=len(frame)).type == "error"


def test_peer_span_must_fit_the_model() -> None:
    with pytest.raises(ValueError):
        peer(start=4, end=4)
    with pytest.raises(ValueError):
        peer(end=9)


def a_step(session_ids: list[str], rows: list[int], step_id: int = 0) -> dict[str, object]:
    total = max(sum(rows), 1)
    return Step.model_construct(
        type="step",
        step_id=step_id,
        session_ids=session_ids,
        rows=rows,
        hidden=WireTensor.from_torch(torch.zeros(total, 1, 4)),
        position_ids=WireTensor.from_torch(torch.zeros(total, 1, dtype=torch.long)),
        attention_mask=None,
        hypo_ids=None,
    ).model_dump()


def test_a_step_of_several_sessions_round_trips_with_an_error_or_none_per_session() -> None:
    step = decode_message(msgpack.packb(a_step(["a", "b"], [1, 2], step_id=7)))
    assert isinstance(step, Step) and step.rows == [1, 2] and step.step_id == 7
    assert decode_message(encode_message(step)) == step
    answer = StepResult(
        step_id=7,
        hidden=WireTensor.from_torch(torch.ones(3, 1, 4)),
        errors=[None, Error(code="unknown_session", message="gone")],
    )
    decoded = decode_message(encode_message(answer))
    assert isinstance(decoded, StepResult) and decoded == answer


def test_a_reply_without_errors_leaves_the_field_out() -> None:
    answer = StepResult(step_id=1, hidden=WireTensor.from_torch(torch.ones(1, 1, 4)))
    assert "errors" not in msgpack.unpackb(encode_message(answer))
    assert decode_message(encode_message(answer)) == answer


def test_an_error_names_the_step_it_refuses() -> None:
    error = Error(code="too_large", message="frame too large", step_id=4)
    assert decode_message(encode_message(error)) == error
    assert "session_id" not in msgpack.unpackb(encode_message(error))


@pytest.mark.parametrize(
    ("sessions", "rows"),
    [([], []), (["a", "a"], [1, 1]), (["a", "b"], [1]), (["a"], [0])],
    ids=["empty", "same session twice", "rows missing", "no rows"],
)
def test_a_step_needs_distinct_sessions_each_with_rows(sessions: list[str], rows: list[int]) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(msgpack.packb(a_step(sessions, rows)))
    assert caught.value.code == "bad_request"


def test_trusted_messages_equal_validated_ones_and_encode_the_same() -> None:
    tensor = WireTensor.from_torch(torch.randn(2, 1, 4))
    values = dict(
        session_ids=["a"],
        rows=[2],
        step_id=3,
        hidden=tensor,
        position_ids=WireTensor.from_torch(torch.ones(2, 1).long()),
    )
    trusted, validated = Step.trusted(**values), Step(**values)
    assert trusted == validated and trusted.attention_mask is None and trusted.type == "step"
    assert trusted.model_fields_set == validated.model_fields_set
    assert encode_message(trusted) == encode_message(validated)
    assert decode_message(encode_message(trusted)) == validated
    with pytest.raises(ValidationError):  # trusted messages stay frozen like the others
        trusted.step_id = 4  # type: ignore[misc]


def empty_lists(count: int) -> bytes:
    """One msgpack array of `count` empty arrays: a byte each on the wire, some 60 bytes each once unpacked."""
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def lists_of_lists(outer: int, inner: int) -> bytes:
    """A step whose `session_ids` holds `outer` arrays of `inner` empty arrays: every single array is short."""
    one = b"\xdc" + inner.to_bytes(2, "big") + b"\x90" * inner
    head = msgpack.packb({"type": "step", "step_id": 0, "session_ids": []})[:-1]  # the map, less its empty list
    return head + b"\xdd" + outer.to_bytes(4, "big") + one * outer


def unpacked_peak(frame: bytes) -> tuple[int, str]:
    """Peak bytes Python allocated while decoding `frame`, and the error code it was refused with."""
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as refused:
            decode_message(frame)
        return tracemalloc.get_traced_memory()[1], refused.value.code
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "frame",
    [empty_lists(4_000_000), lists_of_lists(4_000, 1_000)],
    ids=["one list of 4M empty lists", "4K lists of 1K empty lists in a step"],
)
def test_a_frame_of_a_few_mib_cannot_unpack_into_hundreds_of_mib(frame: bytes) -> None:
    """msgpack objects cost far more unpacked than on the wire (an empty list: 1 byte, ~60 unpacked), so the
    unpacker is bounded by what a valid message can hold; a 4 MiB frame used to take ~250 MB to refuse."""
    peak, code = unpacked_peak(frame)
    assert code == "bad_request"
    assert peak < 32 * 2**20, f"decoding a {len(frame) >> 20} MiB frame allocated {peak >> 20} MiB"


def test_values_no_message_can_hold_are_refused_while_unpacking() -> None:
    too_long = msgpack.packb({"type": "error", "code": "busy", "message": "x" * (64 * 1024)})
    assert "msgpack" in expect_code(too_long, "bad_request")
    huge_map = msgpack.packb({"type": "ack", **{f"k{i}": i for i in range(1000)}})
    assert "msgpack" in expect_code(huge_map, "bad_request")
    timestamp = msgpack.packb({"type": "hello", "version": 0})[:-1] + b"\xd6\xff" + bytes(4)  # version: a date
    assert "msgpack" in expect_code(timestamp, "bad_request")  # extension types are not part of the protocol


def test_the_largest_legal_messages_still_decode() -> None:
    sessions = [f"session-{i}-" + "x" * 100 for i in range(MAX_SESSIONS_PER_STEP)]
    step = decode_message(msgpack.packb(a_step(sessions, [1] * MAX_SESSIONS_PER_STEP)))
    assert isinstance(step, Step) and len(step.session_ids) == MAX_SESSIONS_PER_STEP
    errors = [Error(code="busy", message="é" * 4096, session_id=s) for s in sessions]
    answer = StepResult(step_id=1, hidden=WireTensor.from_torch(torch.ones(1024, 1, 4)), errors=errors)
    assert decode_message(encode_message(answer)) == answer
    view = SwarmView(peers=[peer(peer_id=f"p{i}", codecs=["raw", "int8-block"]) for i in range(5000)])
    assert len(decode_message(encode_message(view)).peers) == 5000
    big_tensor = Forward(
        start=0,
        end=1,
        hidden=WireTensor.from_torch(torch.zeros(8, 1024, 1024)),
        position_ids=WireTensor.from_torch(torch.zeros(8, 1024, dtype=torch.long)),
    )
    assert decode_message(encode_message(big_tensor)) == big_tensor


def test_refusals_escape_the_control_characters_a_peer_put_in_field_names_and_tags() -> None:
    """A refusal's message is logged and shown; a newline from the peer in it would forge a line."""
    extra = expect_code(msgpack.packb({"type": "hello", "version": 3, "x\nINFO forged": 1}), "bad_request")
    tag = expect_code(msgpack.packb({"type": "evil\r\nINFO forged"}), "bad_request")
    for message in (extra, tag):
        assert "forged" in message and "\n" not in message and "\r" not in message
