"""Compressed hops end to end, in one process: a registry and two nodes on loopback, no subprocesses.

The logits with `compression="int8-block"` stay close to the uncompressed swarm's (which equals the local
model); nodes answer in the codec they were asked in, and refuse forged compressed frames without harm."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import torch
import websockets
from transformers import AutoModelForCausalLM, PreTrainedModel
from websockets.sync.client import ClientConnection, connect

from swarm.client import DistributedModelForCausalLM
from swarm.client.core.loop import EventLoopThread
from swarm.client.core.model import parse_compression
from swarm.client.core.planner import ChainPlanner
from swarm.identity import model_id
from swarm.node.server import NodeIdentity, NodeServer
from swarm.node.settings import NodeSettings
from swarm.node.span import LoadedSpan
from swarm.protocol import (
    PROTOCOL_VERSION,
    ForwardResult,
    Hello,
    OpenSession,
    PeerInfo,
    WireTensor,
    decode_message,
    encode_message,
)
from swarm.registry.server import Registry, listen
from tests.swarm.test_protocol import peer

HIDDEN = 64
PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7, 99, 14, 300, 8], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])


@dataclass
class InProcessSwarm:
    registry_url: str
    registry: Registry
    nodes: list[NodeServer]


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path) -> Iterator[InProcessSwarm]:
    """tiny-llama as layers 0-3 and 4-7, served from this process on a background event loop."""
    loop = EventLoopThread()
    registry = Registry()
    nodes = []
    for start, end in ((0, 4), (4, 8)):
        identity = NodeIdentity(
            f"node-{start}", "tiny-llama", 8, start, end, torch.float32, HIDDEN, model_id=model_id(tiny_llama)
        )
        node = NodeServer(NodeSettings(registry=["ws://127.0.0.1:9"]), identity)
        node.take_span(LoadedSpan.load(tiny_llama, start, end, torch.device("cpu"), torch.float32, show_progress=False))
        node.state, node.throughput = "online", 1000.0
        nodes.append(node)

    registry_server = contextlib.AsyncExitStack()

    async def serve() -> tuple[list[websockets.Server], str]:
        listening = await registry_server.enter_async_context(listen(registry, "127.0.0.1", 0))
        servers = []
        for node in nodes:
            servers.append(await websockets.serve(node.handle, "127.0.0.1", 0, compression=None, max_size=2**27))
            node.identity.address = f"ws://127.0.0.1:{servers[-1].sockets[0].getsockname()[1]}"
            registry.state.announce(node.peer_info(), 3600.0, time.monotonic())
        return servers, f"ws://127.0.0.1:{listening.sockets[0].getsockname()[1]}"

    servers, registry_url = loop.run(serve())
    try:
        yield InProcessSwarm(registry_url, registry, nodes)
    finally:

        async def stop() -> None:
            await registry_server.aclose()
            for server in servers:
                server.close()
                await server.wait_closed()
            for task in asyncio.all_tasks():  # the nodes' step schedulers wait for work forever
                if task is not asyncio.current_task():
                    task.cancel()

        loop.run(stop())
        loop.close()


@pytest.fixture(scope="module")
def local_llama(tiny_llama: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def swarm_model(tiny_llama: Path, swarm: InProcessSwarm, compression: str | None) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.registry_url, compression=compression)


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).norm() / reference.norm()).item()


def test_compressed_logits_stay_close_to_uncompressed(
    tiny_llama: Path, swarm: InProcessSwarm, local_llama: PreTrainedModel
) -> None:
    with torch.inference_mode():
        reference = local_llama(PROMPT).logits
    raw, packed = swarm_model(tiny_llama, swarm, None), swarm_model(tiny_llama, swarm, "int8-block")
    try:
        with torch.inference_mode():
            raw_logits, packed_logits = raw(PROMPT).logits, packed(PROMPT).logits  # stateless forwards
        torch.testing.assert_close(raw_logits, reference, atol=1e-4, rtol=0)
        # 4 quantizations (client -> A -> client -> B -> client) of the residual stream: measured 1.07 %
        # relative, max abs 0.007 of logits up to 0.67 (running the nodes in bfloat16 costs about as much)
        assert 0 < relative_error(packed_logits, reference) < 0.02
        assert (packed_logits - reference).abs().max() < 0.05 * reference.abs().max()

        # sessions: a prefill and 8 decode steps, each hop compressed
        generated = packed.generate(
            PROMPT, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        stepped = torch.stack(generated.logits, dim=1)
        with torch.inference_mode():
            exact = local_llama(generated.sequences).logits[:, PROMPT.shape[1] - 1 : -1]
        # measured 1.16 % relative, max abs 0.008
        assert relative_error(stepped, exact) < 0.02
    finally:
        raw.close()
        packed.close()


def test_nodes_that_do_not_advertise_the_codec_get_raw_tensors(
    tiny_llama: Path, swarm: InProcessSwarm, local_llama: PreTrainedModel
) -> None:
    registry = swarm.registry
    for node in swarm.nodes:  # the same nodes, listed as an older version would announce them
        info = node.peer_info().model_copy(update={"model": "tiny-old", "codecs": ["raw"]})
        registry.state.announce(info, 3600.0, time.monotonic())
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, swarm.registry_url, model_name="tiny-old", compression="int8-block"
    )
    try:
        with torch.inference_mode():
            torch.testing.assert_close(model(PROMPT).logits, local_llama(PROMPT).logits, atol=1e-4, rtol=0)
    finally:
        model.close()
        for node in swarm.nodes:
            registry.state.announce(node.peer_info(), 3600.0, time.monotonic())


def test_planner_compresses_only_for_peers_that_advertise_the_codec() -> None:
    planner = ChainPlanner(["ws://127.0.0.1:9"], "m", 8, compression=parse_compression("int8-block"))
    assert planner.codec_for(peer(codecs=["raw", "int8-block"])) == "int8-block"
    assert planner.codec_for(peer()) == "raw"  # an older node: no `codecs` field, so ["raw"]
    assert ChainPlanner(["ws://127.0.0.1:9"], "m", 8).codec_for(peer(codecs=["raw", "int8-block"])) == "raw"
    assert parse_compression("none") == "raw" and parse_compression(None) == "raw"
    with pytest.raises(ValueError, match="int8-block"):
        parse_compression("zstd")


@contextmanager
def connect_to(node: NodeServer) -> Iterator[ClientConnection]:
    with connect(node.identity.address, max_size=None, open_timeout=10) as connection:
        connection.send(encode_message(Hello(version=PROTOCOL_VERSION)))
        welcome = decode_message(connection.recv(timeout=10))
        assert welcome.type == "welcome" and isinstance(welcome.node, PeerInfo)
        assert "int8-block" in welcome.node.codecs
        yield connection


def ask(connection: ClientConnection, frame: bytes) -> dict:
    connection.send(frame)
    return msgpack.unpackb(connection.recv(timeout=30))


def plain(wire: WireTensor) -> dict:
    """A tensor as it appears in a frame (fields at their default left out)."""
    return msgpack.unpackb(encode_message(ForwardResult(hidden=wire)))["hidden"]


def step_frame(session_id: str, hidden: dict, position: int) -> bytes:
    positions = plain(WireTensor.from_torch(torch.tensor([[position]])))
    fields = {"type": "step", "session_ids": [session_id], "rows": [1], "step_id": position, "position_ids": positions}
    return msgpack.packb({**fields, "hidden": hidden}, use_bin_type=True)


def step_error(reply: dict) -> str | None:
    """The code a step failed with: the whole frame's, or its one session's."""
    if reply["type"] == "error":
        return reply["code"]
    return reply["errors"][0]["code"] if reply.get("errors") else None


def open_session(connection: ClientConnection, session_id: str) -> None:
    frame = encode_message(OpenSession(session_id=session_id, start=0, end=4, max_length=16, batch_size=1))
    assert ask(connection, frame)["type"] == "session_opened"


def test_replies_mirror_the_codec_of_the_request(swarm: InProcessSwarm) -> None:
    with connect_to(swarm.nodes[0]) as connection:
        open_session(connection, "mirror")
        raw_reply = ask(connection, step_frame("mirror", plain(WireTensor.from_torch(torch.randn(1, 1, HIDDEN))), 0))
        assert raw_reply["type"] == "step_result" and set(raw_reply["hidden"]) == {"dtype", "shape", "data"}
        packed = plain(WireTensor.from_torch(torch.randn(1, 1, HIDDEN), "int8-block"))
        packed_reply = ask(connection, step_frame("mirror", packed, 1))
        assert packed_reply["hidden"]["codec"] == "int8-block" and len(packed_reply["hidden"]["data"]) == HIDDEN


def test_forged_compressed_frames_get_bad_request_and_the_node_keeps_serving(swarm: InProcessSwarm) -> None:
    good = plain(WireTensor.from_torch(torch.randn(1, 1, HIDDEN), "int8-block"))
    forged = {
        "short scales": dict(good, scales=b"\0\0"),
        "long data": dict(good, data=good["data"] + b"\0"),
        "NaN scale": dict(good, scales=torch.tensor([float("nan")]).numpy().tobytes()),
        "infinite scale": dict(good, scales=torch.tensor([float("inf")]).numpy().tobytes()),
        "integer dtype": dict(good, dtype="int32"),
    }
    with connect_to(swarm.nodes[0]) as connection:
        for index, (what, hidden) in enumerate(forged.items()):
            session_id = f"forged-{index}"
            open_session(connection, session_id)
            reply = ask(connection, step_frame(session_id, hidden, 0))
            assert step_error(reply) == "bad_request" and reply.get("step_id") == 0, (what, reply)
        open_session(connection, "healthy")
        assert ask(connection, step_frame("healthy", good, 0))["type"] == "step_result"
