"""A node under hostile input: every bad frame gets a typed error and ends at most its own session,
while a healthy session keeps generating exactly on the same node."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel
from websockets.sync.client import ClientConnection, connect

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm, Process
from swarm.errors import ErrorCode
from swarm.protocol import (
    PROTOCOL_VERSION,
    CloseSession,
    Hello,
    OpenSession,
    Step,
    WireTensor,
    decode_message,
    encode_message,
)

NAME = "hostile"
HIDDEN = 64
MAX_MESSAGE_BYTES = 256 * 1024
PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7, 99, 14, 300, 8]])


@pytest.fixture(scope="module")
def node(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with LocalSwarm(tmp_path_factory.mktemp("hostile")) as swarm:
        swarm.start_registry()
        process = swarm.start_node(
            tiny_llama, "0-7", "--model-name", NAME, "--max-message-bytes", str(MAX_MESSAGE_BYTES)
        )
        swarm.wait_ready(NAME)
        process.registry_url = swarm.registry_url  # type: ignore[attr-defined]
        yield process


@contextmanager
def raw_connection(node: Process, hello: bool = True) -> Iterator[ClientConnection]:
    """A bare websocket to the node, as an attacker (or a buggy client) would open it."""
    with connect(node.address, max_size=None, open_timeout=10) as connection:
        if hello:
            connection.send(encode_message(Hello(version=PROTOCOL_VERSION)))
            assert decode_message(connection.recv(timeout=10)).type == "welcome"
        yield connection


def ask(connection: ClientConnection, frame: bytes | str):
    connection.send(frame)
    return decode_message(connection.recv(timeout=30))


def expect_error(connection: ClientConnection, frame: bytes | str, code: str) -> str:
    reply = ask(connection, frame)
    assert reply.type == "error", reply
    assert reply.code == code, reply
    return reply.message


def wire(tensor: torch.Tensor) -> WireTensor:
    return WireTensor.from_torch(tensor)


def open_session(connection: ClientConnection, session_id: str, max_length: int = 32) -> None:
    frame = encode_message(OpenSession(session_id=session_id, start=0, end=8, max_length=max_length, batch_size=1))
    assert ask(connection, frame).type == "session_opened"


def expect_step_error(connection: ClientConnection, frame: bytes, code: str) -> str:
    """A step that failed: refused as a whole (an error frame naming it), or its one session's step failed."""
    reply = ask(connection, frame)
    if reply.type == "step_result":
        assert reply.errors is not None and len(reply.errors) == 1, reply
        reply = reply.errors[0]
    assert reply.type == "error" and reply.code == code, reply
    return reply.message


def step_message(session_id: str, hidden: torch.Tensor, positions: torch.Tensor, step_id: int = 0) -> Step:
    return Step(
        step_id=step_id,
        session_ids=[session_id],
        rows=[hidden.shape[0]],
        hidden=wire(hidden),
        position_ids=wire(positions),
    )


def step(session_id: str, hidden: torch.Tensor, positions: torch.Tensor, step_id: int = 0) -> bytes:
    return encode_message(step_message(session_id, hidden, positions, step_id))


def good_step(session_id: str, position: int = 0) -> bytes:
    return step(session_id, torch.randn(1, 1, HIDDEN), torch.tensor([[position]]), position)


def test_the_handshake_refuses_wrong_versions_and_missing_hellos(node: Process) -> None:
    with raw_connection(node, hello=False) as connection:
        message = expect_error(connection, encode_message(Hello(version=PROTOCOL_VERSION + 1)), "unsupported_version")
        assert f"speaks {PROTOCOL_VERSION}" in message  # a client then tries an older version it speaks
    with raw_connection(node, hello=False) as connection:
        assert "hello" in expect_error(connection, good_step("x"), "bad_request")


def test_each_named_bad_frame_gets_its_typed_error(node: Process) -> None:
    with raw_connection(node) as connection:
        expect_error(connection, b"\xc1 this is not msgpack", "bad_request")
        expect_error(connection, "text frames are not the protocol", "bad_request")
        expect_error(connection, msgpack.packb({"type": "announce"}), "bad_request")
        expect_error(connection, msgpack.packb({"type": "step", "session_ids": ["s"]}), "bad_request")
        expect_error(connection, encode_message(Hello(version=PROTOCOL_VERSION)), "bad_request")
        expect_step_error(connection, good_step("never-opened"), "unknown_session")
        frame = encode_message(OpenSession(session_id="r", start=4, end=9, max_length=8, batch_size=1))
        assert "span" in expect_error(connection, frame, "bad_request")
        expect_error(connection, b"\x00" * (MAX_MESSAGE_BYTES + 1), "too_large")

        cases = {
            "dtype": step("s1", torch.ones(1, 1, HIDDEN, dtype=torch.int64), torch.tensor([[0]])),
            "hidden size": step("s2", torch.randn(1, 1, HIDDEN + 1), torch.tensor([[0]])),
            "NaN": step("s3", torch.full((1, 1, HIDDEN), float("nan")), torch.tensor([[0]])),
            "beyond max_length": step("s4", torch.randn(1, 1, HIDDEN), torch.tensor([[99]])),
            "batch": step("s5", torch.randn(2, 1, HIDDEN), torch.tensor([[0], [0]])),
        }
        for session_id, (what, frame) in zip(("s1", "s2", "s3", "s4", "s5"), cases.items(), strict=True):
            open_session(connection, session_id, max_length=16)
            expect_step_error(connection, frame, "bad_request")
            # the bad frame ended that session, and only that one
            assert expect_step_error(connection, good_step(session_id), "unknown_session"), what


def test_positions_going_backwards_end_the_session(node: Process) -> None:
    with raw_connection(node) as connection:
        open_session(connection, "back")
        assert ask(connection, good_step("back", 0)).type == "step_result"
        assert ask(connection, good_step("back", 1)).type == "step_result"
        assert "backwards" in expect_step_error(connection, good_step("back", 0), "bad_request")


def test_sessions_are_private_to_their_connection(node: Process) -> None:
    with raw_connection(node) as owner, raw_connection(node) as intruder:
        open_session(owner, "mine")
        expect_step_error(intruder, good_step("mine"), "unknown_session")
        expect_error(intruder, encode_message(CloseSession(session_id="mine")), "unknown_session")
        assert ask(owner, good_step("mine")).type == "step_result"


def test_a_node_refuses_an_older_protocol_version_with_the_one_it_speaks(node: Process) -> None:
    with raw_connection(node, hello=False) as connection:
        message = expect_error(connection, encode_message(Hello(version=2)), "unsupported_version")
        assert message.startswith("protocol version 2") and str(PROTOCOL_VERSION) in message


def several(session_ids: list[str], hidden: torch.Tensor, position: int, rows: list[int] | None = None) -> bytes:
    """One step frame for several sessions, their rows stacked."""
    rows = rows or [1] * len(session_ids)
    message = Step(
        step_id=position,
        session_ids=session_ids,
        rows=rows,
        hidden=wire(hidden),
        position_ids=wire(torch.full((sum(rows), hidden.shape[1]), position)),
    )
    return encode_message(message)


def test_a_step_of_several_sessions_gives_each_what_its_own_steps_give(node: Process) -> None:
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 1, HIDDEN, generator=generator) for _ in range(3)]
    with raw_connection(node) as connection:
        for session_id in ("g1", "g2", "a1", "a2"):
            open_session(connection, session_id)
        for position, hidden in enumerate(inputs):
            reply = ask(connection, several(["g1", "g2"], hidden, position))
            assert reply.type == "step_result" and reply.errors is None and reply.step_id == position
            grouped = reply.hidden.to_torch()
            alone = [
                ask(connection, step(sid, hidden[i : i + 1], torch.tensor([[position]]), position))
                for i, sid in enumerate(("a1", "a2"))
            ]
            torch.testing.assert_close(grouped, torch.cat([r.hidden.to_torch() for r in alone]), rtol=1e-5, atol=1e-5)


def test_a_bad_session_inside_a_step_ends_only_its_own_session(node: Process) -> None:
    with raw_connection(node) as connection, raw_connection(node) as other:
        for session_id in ("q1", "q2", "q3"):
            open_session(connection, session_id)
        open_session(other, "their-q")
        # q2 was opened for one row and claims two; their-q belongs to another connection
        reply = ask(connection, several(["q1", "q2", "their-q", "q3"], torch.randn(5, 1, HIDDEN), 0, [1, 2, 1, 1]))
        assert reply.type == "step_result"
        assert [error.code if error else None for error in reply.errors] == [
            None,
            "bad_request",
            "unknown_session",
            None,
        ]
        assert reply.hidden.shape == [5, 1, HIDDEN]
        assert not reply.hidden.to_torch()[1:4].any(), "the failed sessions' rows are zeros"
        assert ask(connection, good_step("q1", 1)).type == "step_result"
        assert ask(connection, good_step("q3", 1)).type == "step_result"
        expect_step_error(connection, good_step("q2", 0), "unknown_session")
        assert ask(other, good_step("their-q", 0)).type == "step_result"


def test_a_step_with_bad_tensors_fails_every_session_in_it(node: Process) -> None:
    with raw_connection(node) as connection:
        for session_id in ("n1", "n2"):
            open_session(connection, session_id)
        hidden = torch.randn(2, 1, HIDDEN)
        hidden[1, 0, 5] = float("nan")
        reply = ask(connection, several(["n1", "n2"], hidden, 0))
        assert [error.code for error in reply.errors] == ["bad_request", "bad_request"]
        assert "NaN" in reply.errors[0].message
        for session_id in ("n1", "n2"):
            expect_step_error(connection, good_step(session_id), "unknown_session")


def test_steps_in_flight_together_are_answered_each_by_its_step_id(node: Process) -> None:
    """A client need not wait for a reply before its next step: every reply names its step."""
    with raw_connection(node) as connection:
        for session_id in ("p1", "p2"):
            open_session(connection, session_id)
        frames = [good_step("p1", 0), good_step("p2", 0)]
        frames.append(step("p1", torch.randn(1, 1, HIDDEN), torch.tensor([[1]]), 7))  # p1's next, right away
        for frame in frames:
            connection.send(frame)
        replies = [decode_message(connection.recv(timeout=30)) for _ in frames]
        assert sorted(reply.step_id for reply in replies) == [0, 0, 7]
        assert all(reply.type == "step_result" and reply.errors is None for reply in replies)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
message_types = st.sampled_from(
    [
        "hello",
        "step",
        "open_session",
        "close_session",
        "forward",
        "query",
        "announce",
        "error",
        "welcome",
        "step_result",
        "nonsense",
    ]
)
tensor_maps = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float32", "bfloat16", "int64", "bool", "float64", "x"]),
        "shape": st.lists(st.integers(-2, 5), max_size=5),
        "data": st.binary(max_size=256),
    }
)
frames = st.one_of(
    st.binary(max_size=256),
    st.dictionaries(st.text(max_size=12), json_values, max_size=6).map(msgpack.packb),
    st.builds(
        lambda kind, fields, hidden, positions: msgpack.packb(
            {
                "type": kind,
                "session_id": "fuzz",
                "session_ids": ["fuzz"],
                "rows": [1],
                "step_id": 0,
                "start": 0,
                "end": 8,
                "hidden": hidden,
                "position_ids": positions,
                **fields,
            }
        ),
        message_types,
        st.dictionaries(st.text(max_size=10), json_values, max_size=3),
        tensor_maps,
        tensor_maps,
    ),
)


def test_random_frames_never_take_the_node_down_nor_disturb_a_healthy_session(
    node: Process, tiny_llama: Path, local_llama: PreTrainedModel
) -> None:
    expected = local_llama.generate(PROMPT, max_new_tokens=60, do_sample=False).tolist()
    healthy = DistributedModelForCausalLM.from_pretrained(
        tiny_llama,
        registry=node.registry_url,
        model_name=NAME,  # type: ignore[attr-defined]
    )
    results: dict[str, object] = {}

    def generate() -> None:
        try:
            results["tokens"] = healthy.generate(PROMPT, max_new_tokens=60, do_sample=False).tolist()
        except BaseException as exc:
            results["error"] = exc

    worker = threading.Thread(target=generate)
    with raw_connection(node) as connection:
        open_session(connection, "fuzz")
        worker.start()

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(frames)
        def each_frame_is_answered_in_protocol(frame: bytes) -> None:
            reply = ask(connection, frame)
            answers = (
                "error",
                "step_result",
                "session_opened",
                "session_closed",
                "forward_result",
            )
            assert reply.type in answers
            if reply.type == "error":
                assert reply.code in set(ErrorCode)

        each_frame_is_answered_in_protocol()
        worker.join(timeout=120)
    healthy.close()
    assert node.alive()
    assert "error" not in results, results.get("error")
    assert results["tokens"] == expected
