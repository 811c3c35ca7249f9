"""What an announcement may claim: every field of `PeerInfo` is bounded, so no announce can make a registry's
state, pages or logs grow beyond what an honest node needs."""

from __future__ import annotations

import msgpack
import pytest

from swarm.errors import ErrorCode, ProtocolError
from swarm.protocol import Announce, decode_message
from tests.swarm.test_routing import peer


def announce_frame(**changes: object) -> bytes:
    return msgpack.packb({"type": "announce", "ttl": 15.0, "peer": peer("a", 0, 8).model_dump() | changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"num_layers": 100_000, "end": 100_000},
        {"num_layers": 4097, "end": 4097},
        {"start": 4, "end": 2},
        {"end": 9},
        {"throughput": float("inf")},
        {"throughput": float("nan")},
        {"throughput": 1e12},
        {"throughput": -1.0},
        {"cache_tokens_free": -1},
        {"sessions": -1},
        {"sessions": 2**41},
        {"peer_id": "p" * 129},
        {"model": "m" * 129},
        {"address": "ws://" + "a" * 600},
        {"version": "v" * 65},
        {"dtype": "float64"},
        {"codecs": ["raw"] * 17},
        {"codecs": ["c" * 33]},
        {"peer_id": "a\nforged log line"},
        {"model": "m\r"},
        {"address": "ws://x\x1b[2J"},
        {"version": "1.0\u2028"},
    ],
    ids=str,
)
def test_announcements_claiming_too_much_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_message(announce_frame(**changes))
    assert refused.value.code is ErrorCode.BAD_REQUEST


def test_the_largest_honest_announcement_is_accepted() -> None:
    frame = announce_frame(
        peer_id="p" * 128,
        model="Meta-Llama-3.1-405B-Instruct · ünïcode",
        address="wss://" + "a" * 500,
        num_layers=4096,
        start=4000,
        end=4096,
        throughput=1e9,
        sessions=10_000,
        version="v" * 64,
        codecs=["raw", "int8-block"],
    )
    message = decode_message(frame)
    assert isinstance(message, Announce) and message.peer.num_layers == 4096
