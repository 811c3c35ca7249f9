"""A node process with its default settings against cheap attacks from raw websockets: frames that unpack into
gigabytes, connections that never say hello, a session id that forges log lines. Each attack costs the node little
memory and time, and an honest session on it keeps generating."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm, Process
from swarm.protocol import CloseSession, OpenSession, decode_message, encode_message
from tests.swarm_sim.test_hostile_input import raw_connection

NAME = "hardened"
PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7, 99, 14, 300, 8]])


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("hardening")) as local:
        local.start_registry()
        local.start_node(tiny_llama, "0-7", "--model-name", NAME)
        local.wait_ready(NAME)
        yield local


@pytest.fixture(scope="module")
def node(swarm: LocalSwarm) -> Process:
    return swarm.processes[-1]


def empty_lists(count: int) -> bytes:
    """A msgpack array of `count` empty arrays: one byte each on the wire, ~60 once unpacked."""
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def nested_lists(count: int) -> bytes:
    """`count` empty arrays in arrays of 1000: no single array is long."""
    inner = b"\xdc" + (1000).to_bytes(2, "big") + b"\x90" * 1000
    return b"\xdd" + (count // 1000).to_bytes(4, "big") + inner * (count // 1000)


def peak_growth(node: Process, attack: Callable[[], None]) -> float:
    """MiB the node's peak resident memory grew by while `attack()` ran."""
    status = Path(f"/proc/{node.popen.pid}/status")

    def read(field: str) -> float:
        line = next(line for line in status.read_text().splitlines() if line.startswith(field))
        return int(line.split()[1]) / 1024

    try:
        Path(f"/proc/{node.popen.pid}/clear_refs").write_text("5")  # the peak starts again from the current size
        before = read("VmRSS:")
    except OSError:
        before = read("VmHWM:")
    attack()
    time.sleep(0.5)
    return read("VmHWM:") - before


def test_a_huge_first_frame_is_refused_unread(node: Process) -> None:
    """57 MiB of empty arrays before any hello took a node from 0.4 to 4.7 GB for 35 s, token or no token."""
    outcome: list[object] = []

    def attack() -> None:
        began = time.monotonic()
        with connect(node.address, max_size=None, open_timeout=10) as connection:
            connection.send(empty_lists(16 * 2**20))
            with pytest.raises(ConnectionClosed) as closed:
                connection.recv(timeout=30)
        outcome.extend([closed.value.rcvd.code if closed.value.rcvd else None, time.monotonic() - began])

    assert peak_growth(node, attack) < 64
    code, seconds = outcome
    assert code == 1009 and seconds < 5, outcome  # message too big


@pytest.mark.parametrize("frame", [empty_lists(16 * 2**20), nested_lists(16 * 2**20)], ids=["flat", "nested"])
def test_a_frame_that_would_unpack_into_gigabytes_is_refused_at_once(node: Process, frame: bytes) -> None:
    replies: list[object] = []

    def attack() -> None:
        began = time.monotonic()
        with raw_connection(node) as connection:
            connection.send(frame)
            replies.extend([decode_message(connection.recv(timeout=60)), time.monotonic() - began])

    assert peak_growth(node, attack) < 128  # the frame itself, in and out of the websocket
    reply, seconds = replies
    assert reply.type == "error" and reply.code == "bad_request" and seconds < 3, replies


def test_an_honest_generation_is_not_stalled_by_an_amplification_frame(
    node: Process, swarm: LocalSwarm, tiny_llama: Path
) -> None:
    """15 MiB of empty arrays stalled a 0.36 s generation to 3 s (28 s on a slower machine)."""
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url, model_name=NAME)
    try:
        model.generate(PROMPT, max_new_tokens=4, do_sample=False)
        began = time.monotonic()
        alone = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
        quiet = time.monotonic() - began
        with raw_connection(node) as attacker, connect(node.address, max_size=None, open_timeout=10) as stranger:
            attacker.send(nested_lists(15 * 2**20))
            stranger.send(empty_lists(15 * 2**20))
            began = time.monotonic()
            attacked = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
            busy = time.monotonic() - began
    finally:
        model.close()
    assert attacked.tolist() == alone.tolist()
    assert busy < 3 * quiet + 1.0, (quiet, busy)


def test_connections_that_never_say_hello_are_closed(node: Process) -> None:
    closed = 0
    with ExitStack() as stack:
        silent = [stack.enter_context(connect(node.address, open_timeout=10)) for _ in range(20)]
        time.sleep(7)  # the default --hello-timeout is 5 s
        for connection in silent:
            try:
                while True:
                    connection.recv(timeout=2)  # the refusal, then the close
            except ConnectionClosed:
                closed += 1
            except TimeoutError:
                pass
    assert closed == len(silent)


def test_a_session_id_cannot_forge_a_line_in_the_nodes_log(node: Process) -> None:
    forged = "x\n2026-01-01 00:00:00,000 INFO swarm.node: FORGED line"
    with raw_connection(node) as connection:
        opened = OpenSession(session_id=forged, start=0, end=8, max_length=16, batch_size=1)
        connection.send(encode_message(opened))
        assert decode_message(connection.recv(timeout=10)).type == "session_opened"
        connection.send(encode_message(CloseSession(session_id=forged)))
        connection.recv(timeout=10)
        connection.send(
            encode_message(OpenSession(session_id=forged + "2", start=0, end=8, max_length=16, batch_size=1))
        )
        connection.recv(timeout=10)
    time.sleep(0.5)  # the node logs the session freed when the connection closed
    log = node.log()
    assert "x\\n2026-01-01" in log
    assert not [line for line in log.splitlines() if line.startswith("2026-01-01 00:00:00,000")]
