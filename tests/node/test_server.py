"""A node's endpoint under a greedy or hostile client, in-process: one client cannot lock others out nor hold the
node's loop, a connection that never says hello is closed, and what peers name is quoted in the node's logs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import websockets
from websockets.asyncio.client import ClientConnection, connect

from swarm.node.server import NodeIdentity, NodeServer
from swarm.node.settings import NodeSettings
from swarm.node.span import LoadedSpan
from swarm.protocol import (
    PROTOCOL_VERSION,
    CloseSession,
    Forward,
    Hello,
    Message,
    OpenSession,
    Step,
    WireTensor,
    decode_message,
    encode_message,
)
from swarm.transport import HELLO_MAX_BYTES

HIDDEN = 64
MAX_POSITIONS = 512  # tiny-llama's max_position_embeddings


@asynccontextmanager
async def serving(checkpoint: Path, **settings: object) -> AsyncIterator[tuple[NodeServer, str]]:
    """A node serving all 8 layers of `checkpoint` on a free loopback port, online, as `swarm.node.service` serves
    it (frames limited to a hello's size until the hello is accepted)."""
    options = NodeSettings(registry=["ws://127.0.0.1:1"], **settings)  # type: ignore[arg-type]
    identity = NodeIdentity("peer", "tiny", 8, 0, 8, torch.float32, HIDDEN)
    node = NodeServer(options, identity)
    node.span = LoadedSpan.load(checkpoint, 0, 8, torch.device("cpu"), torch.float32, show_progress=False)
    node.state = "online"
    async with websockets.serve(node.handle, "127.0.0.1", 0, max_size=2 * HELLO_MAX_BYTES, compression=None) as server:
        identity.address = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        yield node, identity.address


def run(checkpoint: Path, scenario: Callable[[NodeServer, str], Awaitable[None]], **settings: object) -> None:
    async def main() -> None:
        async with serving(checkpoint, **settings) as (node, address):
            await scenario(node, address)

    asyncio.run(main())


@asynccontextmanager
async def client(address: str) -> AsyncIterator[ClientConnection]:
    async with connect(address, max_size=None) as connection:
        await connection.send(encode_message(Hello(version=PROTOCOL_VERSION)))
        assert decode_message(await connection.recv()).type == "welcome"
        yield connection


async def ask(connection: ClientConnection, message: Message) -> Message:
    await connection.send(encode_message(message))
    return decode_message(await asyncio.wait_for(connection.recv(), 60))


def opening(session_id: str, max_length: int = 64, batch_size: int = 1) -> OpenSession:
    return OpenSession(session_id=session_id, start=0, end=8, max_length=max_length, batch_size=batch_size)


def stepping(session_id: str, position: int, tokens: int = 1, step_id: int = 0) -> Step:
    return Step(
        step_id=step_id,
        session_ids=[session_id],
        rows=[1],
        hidden=WireTensor.from_torch(torch.randn(1, tokens, HIDDEN)),
        position_ids=WireTensor.from_torch(torch.arange(position, position + tokens)[None]),
    )


def forwarding(batch: int, tokens: int, positions: torch.Tensor | None = None) -> Forward:
    positions = torch.arange(tokens).expand(batch, tokens) if positions is None else positions
    return Forward(
        start=0,
        end=8,
        hidden=WireTensor.from_torch(torch.randn(batch, tokens, HIDDEN)),
        position_ids=WireTensor.from_torch(positions.contiguous()),
    )


async def open_until_refused(connection: ClientConnection, tag: str, count: int, max_length: int) -> list[Message]:
    return [await ask(connection, opening(f"{tag}{i}", max_length)) for i in range(count)]


@pytest.mark.parametrize(("count", "max_length"), [(8, 8192), (64, 16)], ids=["8 long sessions", "64 short sessions"])
def test_a_greedy_connection_cannot_lock_an_honest_one_out(tiny_llama: Path, count: int, max_length: int) -> None:
    """Either fills a node's defaults (65536 cache tokens, 64 sessions) in milliseconds, without a single step."""

    async def scenario(node: NodeServer, address: str) -> None:
        async with client(address) as greedy, client(address) as honest:
            replies = await open_until_refused(greedy, "greedy", count, max_length)
            refused = [reply for reply in replies if reply.type == "error"]
            assert refused and all(reply.code == "busy" and "one client" in reply.message for reply in refused)
            assert (await ask(honest, opening("honest"))).type == "session_opened"
            assert (await ask(honest, stepping("honest", 0))).type == "step_result"

    run(tiny_llama, scenario)


def test_a_full_node_gives_sessions_that_never_stepped_to_a_new_client(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("swarm.node.sessions.RECLAIM_AFTER", 0.0)

    async def scenario(node: NodeServer, address: str) -> None:
        async with client(address) as first, client(address) as second, client(address) as honest:
            for greedy, tag in ((first, "a"), (second, "b")):  # each within its share; together, the whole node
                assert {reply.type for reply in await open_until_refused(greedy, tag, 4, 8192)} == {"session_opened"}
            assert (await ask(honest, opening("honest", 8192))).type == "session_opened"
            assert (await ask(honest, stepping("honest", 0))).type == "step_result"
            assert (await ask(first, stepping("a0", 0))).errors[0].code == "unknown_session"  # reclaimed, oldest

    run(tiny_llama, scenario)


def test_sessions_that_never_step_are_freed_after_the_first_step_timeout(tiny_llama: Path) -> None:
    async def scenario(node: NodeServer, address: str) -> None:
        async with client(address) as connection:
            for session_id in ("silent", "stepped"):
                await ask(connection, opening(session_id))
            await ask(connection, stepping("stepped", 0))
            await asyncio.sleep(0.5)
            node.expire_sessions()
            assert (await ask(connection, stepping("silent", 0))).errors[0].code == "unknown_session"
            assert (await ask(connection, stepping("stepped", 1))).errors is None

    run(tiny_llama, scenario, first_step_timeout=0.3)


def test_a_client_over_its_steps_per_second_is_told_busy(tiny_llama: Path) -> None:
    async def scenario(node: NodeServer, address: str) -> None:
        async with client(address) as connection, client(address) as other:
            await ask(connection, opening("s"))
            replies = [await ask(connection, stepping("s", position, step_id=position)) for position in range(8)]
            refused = [reply for reply in replies if reply.type == "error"]
            assert len(refused) >= 3 and all(r.code == "busy" and "per second" in r.message for r in refused)
            assert refused[0].step_id is not None, "the refusal names its step"
            await ask(other, opening("t"))
            assert (await ask(other, stepping("t", 0))).type == "step_result"

    run(tiny_llama, scenario, max_steps_per_second_per_client=4)


def test_positions_past_the_models_position_embeddings_are_refused(tiny_llama: Path) -> None:
    """tiny-llama was trained on 512 positions; --max-length (8192 by default) alone let a peer go past them."""

    async def scenario(node: NodeServer, address: str) -> None:
        async with client(address) as connection:
            await ask(connection, opening("long", max_length=1024))
            refused = await ask(connection, stepping("long", MAX_POSITIONS))
            assert refused.errors[0].code == "bad_request" and str(MAX_POSITIONS) in refused.errors[0].message
            await ask(connection, opening("edge", max_length=1024))
            assert (await ask(connection, stepping("edge", MAX_POSITIONS - 1))).errors is None
            forward = await ask(connection, forwarding(1, 4, torch.tensor([[0, 1, 2, MAX_POSITIONS]])))
            assert forward.type == "error" and forward.code == "bad_request"

    run(tiny_llama, scenario)


def test_a_forward_is_bounded_in_tokens_and_length(tiny_llama: Path) -> None:
    async def scenario(node: NodeServer, address: str) -> None:
        async with client(address) as connection:
            began = time.monotonic()
            many = await ask(connection, forwarding(15, 500))  # 7500 tokens, every position below 512
            assert many.type == "error" and many.code == "bad_request" and "4096" in many.message
            repeated = await ask(connection, forwarding(1, 600, torch.zeros(1, 600, dtype=torch.long)))
            assert repeated.type == "error" and repeated.code == "bad_request" and "512" in repeated.message
            assert time.monotonic() - began < 2.0

    run(tiny_llama, scenario, max_forward_tokens=4096, max_message_bytes=2**26)


def test_a_forward_equals_the_layers_over_the_whole_sequence(tiny_llama: Path) -> None:
    """Computed in chunks over a cache of its own, it gives what one pass over the sequence gives."""

    async def scenario(node: NodeServer, address: str) -> None:
        padded = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
        positions = (padded.cumsum(-1) - 1).clamp(min=0)
        message = forwarding(2, 10, positions)
        message = message.model_copy(update={"attention_mask": WireTensor.from_torch(padded.bool())})
        async with client(address) as connection:
            reply = await ask(connection, message)
        assert node.span is not None
        whole = node.span.forward_stateless(message.hidden.to_torch(), positions, padded.bool(), 0, 8)
        real = padded.bool()
        torch.testing.assert_close(reply.hidden.to_torch()[real], whole[real], atol=1e-4, rtol=0)

    run(tiny_llama, scenario, prefill_chunk=3)


def test_an_honest_step_answers_promptly_while_a_large_forward_is_served(tiny_llama: Path) -> None:
    """A forward held the node's loop until it was done, and every session's step waited behind it; it now runs a
    chunk per round, so steps are answered while it is still being computed."""

    async def scenario(node: NodeServer, address: str) -> None:
        async with client(address) as honest, client(address) as heavy:
            await ask(honest, opening("honest"))
            await ask(honest, stepping("honest", 0))
            await heavy.send(encode_message(forwarding(64, MAX_POSITIONS)))
            forwarded = asyncio.create_task(heavy.recv())
            await asyncio.sleep(0.2)  # the forward is being computed
            latencies = []
            for position in range(1, 6):
                began = time.perf_counter()
                assert (await ask(honest, stepping("honest", position))).errors is None
                latencies.append(time.perf_counter() - began)
            assert not forwarded.done(), "the steps were answered only after the forward"
            reply = decode_message(await asyncio.wait_for(forwarded, 120))
            assert reply.type == "forward_result" and reply.hidden.shape == [64, MAX_POSITIONS, HIDDEN]
        assert max(latencies) < 1.0, latencies

    run(tiny_llama, scenario, max_forward_tokens=64 * MAX_POSITIONS)


def test_a_connection_that_never_says_hello_is_closed(tiny_llama: Path) -> None:
    async def scenario(node: NodeServer, address: str) -> None:
        async with connect(address) as silent:
            refusal = decode_message(await asyncio.wait_for(silent.recv(), 5))
            assert refusal.type == "error" and "hello" in refusal.message
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(silent.recv(), 5)

    run(tiny_llama, scenario, hello_timeout=0.3)


def test_what_peers_name_is_quoted_in_the_nodes_log(tiny_llama: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A session id with a newline forged a whole log line."""
    forged = "x\n2026-01-01 00:00:00,000 INFO swarm.node: node online, all is well"

    async def scenario(node: NodeServer, address: str) -> None:
        async with client(address) as connection:
            await ask(connection, opening(forged))
            await ask(connection, opening(forged + "2"))
            await ask(connection, stepping(forged + "2", 10_000))  # refused: ends that session, logged
            await ask(connection, opening(forged + "3"))
            await ask(connection, CloseSession(session_id=forged + "3"))
        await asyncio.sleep(0.2)  # the node frees the first one when the connection closes

    with caplog.at_level(logging.DEBUG, logger="swarm"):
        run(tiny_llama, scenario)
    logged = [record.getMessage() for record in caplog.records if record.name.startswith("swarm")]
    assert sum("x\\n2026" in line for line in logged) >= 2, logged
    assert not [line for line in logged if "\n" in line or "\r" in line]
