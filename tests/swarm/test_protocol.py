"""The wire contract: what round-trips, and what is refused with which error code."""

from __future__ import annotations

import msgpack
import pytest
import torch
from pydantic import ValidationError

from swarm.errors import ProtocolError
from swarm.protocol import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    PeerInfo,
    Step,
    StepGroup,
    StepGroupResult,
    StepMany,
    StepManyResult,
    StepResult,
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
        session_id="s",
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
    message = expect_code(msgpack.packb({"type": "step", "session_id": "s"}), "bad_request")
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


def a_step(session_id: str) -> Step:
    return Step(
        session_id=session_id,
        step_id=0,
        hidden=WireTensor.from_torch(torch.zeros(1, 1, 4)),
        position_ids=WireTensor.from_torch(torch.zeros(1, 1, dtype=torch.long)),
    )


def test_step_many_round_trips_with_a_result_or_an_error_per_step() -> None:
    many = StepMany(steps=[a_step("a"), a_step("b")])
    assert decode_message(encode_message(many)) == many
    answer = StepManyResult(
        results=[
            StepResult(session_id="a", step_id=0, hidden=WireTensor.from_torch(torch.ones(1, 1, 4))),
            Error(code="bad_request", message="wrong shape", session_id="b"),
        ]
    )
    decoded = decode_message(encode_message(answer))
    assert isinstance(decoded, StepManyResult)
    assert [type(result) for result in decoded.results] == [StepResult, Error]


@pytest.mark.parametrize("sessions", [[], ["a", "a"]], ids=["empty", "same session twice"])
def test_step_many_needs_distinct_sessions_and_at_least_one_step(sessions: list[str]) -> None:
    frame = msgpack.packb({"type": "step_many", "steps": [a_step(s).model_dump() for s in sessions]})
    with pytest.raises(ProtocolError) as caught:
        decode_message(frame)
    assert caught.value.code == "bad_request"


def a_group(session_ids: list[str], step_ids: list[int], rows: list[int]) -> dict[str, object]:
    total = sum(rows)
    return StepGroup.model_construct(
        type="step_group",
        session_ids=session_ids,
        step_ids=step_ids,
        rows=rows,
        hidden=WireTensor.from_torch(torch.zeros(total, 1, 4)),
        position_ids=WireTensor.from_torch(torch.zeros(total, 1, dtype=torch.long)),
        attention_mask=None,
    ).model_dump()


def test_step_group_round_trips_with_an_error_or_none_per_session() -> None:
    group = decode_message(msgpack.packb(a_group(["a", "b"], [3, 0], [1, 2])))
    assert isinstance(group, StepGroup) and group.rows == [1, 2]
    assert decode_message(encode_message(group)) == group
    answer = StepGroupResult(
        hidden=WireTensor.from_torch(torch.ones(3, 1, 4)),
        errors=[None, Error(code="unknown_session", message="gone", session_id="b")],
    )
    decoded = decode_message(encode_message(answer))
    assert isinstance(decoded, StepGroupResult) and decoded == answer


@pytest.mark.parametrize(
    ("sessions", "step_ids", "rows"),
    [([], [], []), (["a", "a"], [0, 0], [1, 1]), (["a", "b"], [0], [1, 1]), (["a"], [0], [0])],
    ids=["empty", "same session twice", "a step id missing", "no rows"],
)
def test_step_group_needs_distinct_sessions_each_with_a_step_id_and_rows(
    sessions: list[str], step_ids: list[int], rows: list[int]
) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(msgpack.packb(a_group(sessions, step_ids, rows)))
    assert caught.value.code == "bad_request"


def test_trusted_messages_equal_validated_ones_and_encode_the_same() -> None:
    tensor = WireTensor.from_torch(torch.randn(2, 1, 4))
    values = dict(session_id="a", step_id=3, hidden=tensor, position_ids=WireTensor.from_torch(torch.ones(2, 1).long()))
    trusted, validated = Step.trusted(**values), Step(**values)
    assert trusted == validated and trusted.attention_mask is None and trusted.type == "step"
    assert trusted.model_fields_set == validated.model_fields_set
    assert encode_message(trusted) == encode_message(validated)
    assert decode_message(encode_message(trusted)) == validated
    with pytest.raises(ValidationError):  # trusted messages stay frozen like the others
        trusted.step_id = 4  # type: ignore[misc]
