"""A registry under random frames: every one is answered in protocol, the registry stays up, and an honest node
stays listed and usable throughout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel
from websockets.sync.client import connect

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm
from swarm.errors import ErrorCode
from swarm.protocol import PROTOCOL_VERSION, Hello, decode_message, encode_message
from tests.swarm_sim.test_hostile_input import json_values

NAME = "fuzzed"
PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7]])

peer_maps = st.fixed_dictionaries(
    {
        "peer_id": st.text(max_size=20),
        "address": st.text(max_size=30),
        "model": st.sampled_from([NAME, "other", "", "x" * 200]),
        "num_layers": st.integers(-1, 200_000),
        "start": st.integers(-1, 10),
        "end": st.integers(-1, 10),
        "state": st.sampled_from(["online", "gone", "joining", "?"]),
        "dtype": st.sampled_from(["float32", "float64", "bool"]),
        "throughput": st.floats(allow_nan=True, allow_infinity=True),
        "cache_tokens_free": st.integers(-5, 2**50),
        "cache_tokens_total": st.integers(-5, 2**50),
    },
    optional={"model_id": st.text(max_size=40), "weights": st.text(max_size=40), "codecs": json_values},
)
registry_frames = st.one_of(
    st.binary(max_size=256),
    st.dictionaries(st.text(max_size=12), json_values, max_size=6).map(msgpack.packb),
    st.builds(
        lambda kind, peer, fields: msgpack.packb(
            {"type": kind, "peer": peer, "ttl": 5.0, "peer_id": peer["peer_id"], "model": NAME, **fields}
        ),
        st.sampled_from(["announce", "leave", "query", "report", "hello", "step", "nonsense"]),
        peer_maps,
        st.dictionaries(st.sampled_from(["reason", "model_id", "ttl", "extra"]), json_values, max_size=2),
    ),
)


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("registry-fuzz")) as swarm:
        swarm.start_registry()
        swarm.start_node(tiny_llama, "0-7", "--model-name", NAME)
        swarm.wait_ready(NAME)
        yield swarm


def test_random_frames_never_take_the_registry_down_nor_the_honest_node_off_it(
    swarm: LocalSwarm, tiny_llama: Path, local_llama: PreTrainedModel
) -> None:
    with connect(swarm.registry_url, max_size=None, open_timeout=10) as connection:
        connection.send(encode_message(Hello(version=PROTOCOL_VERSION)))
        assert decode_message(connection.recv(timeout=10)).type == "welcome"

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(registry_frames)
        def each_frame_is_answered_in_protocol(frame: bytes) -> None:
            connection.send(frame)
            reply = decode_message(connection.recv(timeout=30))
            assert reply.type in ("ack", "swarm_view", "error")
            if reply.type == "error":
                assert reply.code in set(ErrorCode)

        each_frame_is_answered_in_protocol()
    swarm.wait_ready(NAME, timeout=10)
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url, model_name=NAME)
    try:
        expected = local_llama.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()
        assert model.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist() == expected
    finally:
        model.close()
