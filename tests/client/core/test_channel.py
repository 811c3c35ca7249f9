"""`PeerChannel`: several requests in flight on one connection, each reply handed to whoever it answers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from swarm.client.core.channel import PeerChannel
from swarm.errors import PeerUnreachableError, RemoteError
from swarm.protocol import (
    Error,
    OpenSession,
    SessionOpened,
    Step,
    StepResult,
    WireTensor,
    decode_message,
    encode_message,
)


class Peer:
    """Stands for a node's connection: holds the frames it is sent until `answer` releases their replies, in
    whatever order the test asks for."""

    def __init__(self) -> None:
        self.received: list[Step | OpenSession] = []
        self._outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.state = SimpleNamespace(name="OPEN")
        self.transport = SimpleNamespace(abort=self.drop)

    async def send(self, frame: bytes) -> None:
        self.received.append(decode_message(frame))  # type: ignore[arg-type]

    def answer(self, index: int, reply: object) -> None:
        self._outgoing.put_nowait(encode_message(reply))  # type: ignore[arg-type]

    def echo(self, index: int) -> None:
        step = self.received[index]
        assert isinstance(step, Step)
        self.answer(index, StepResult(step_id=step.step_id, hidden=step.hidden))

    def drop(self) -> None:
        self.state.name = "CLOSED"
        self._outgoing.put_nowait(None)

    def __aiter__(self) -> Peer:
        return self

    async def __anext__(self) -> bytes:
        frame = await self._outgoing.get()
        if frame is None:
            raise StopAsyncIteration
        return frame

    async def close(self) -> None:
        self.drop()


def a_step(channel: PeerChannel, session: str, value: float) -> Step:
    return Step(
        step_id=channel.next_step_id(),
        session_ids=[session],
        rows=[1],
        hidden=WireTensor.from_torch(torch.full((1, 1, 4), value)),
        position_ids=WireTensor.from_torch(torch.zeros(1, 1, dtype=torch.long)),
    )


def value(result: StepResult) -> float:
    return result.hidden.to_torch()[0, 0, 0].item()


def test_steps_in_flight_together_each_get_their_own_reply_in_any_order() -> None:
    async def scenario() -> tuple[list[float], int]:
        peer = Peer()
        channel = PeerChannel("ws://peer", peer, timeout=5.0)  # type: ignore[arg-type]
        waiting = [asyncio.ensure_future(channel.step(a_step(channel, s, v))) for s, v in (("a", 1.0), ("b", 2.0))]
        await asyncio.sleep(0.01)
        sent = len(peer.received)  # both frames left before either reply came back
        peer.echo(1)
        peer.echo(0)
        return [value(result) for result in await asyncio.gather(*waiting)], sent

    assert asyncio.run(scenario()) == ([1.0, 2.0], 2)


def test_sessions_open_by_their_id_beside_steps_in_flight() -> None:
    async def scenario() -> tuple[str, float]:
        peer = Peer()
        channel = PeerChannel("ws://peer", peer, timeout=5.0)  # type: ignore[arg-type]
        step = asyncio.ensure_future(channel.step(a_step(channel, "a", 3.0)))
        opening = OpenSession(session_id="b", start=0, end=1, max_length=8, batch_size=1)
        opened = asyncio.ensure_future(channel.request(opening, SessionOpened))
        await asyncio.sleep(0.01)
        peer.answer(1, SessionOpened(session_id="b"))
        peer.echo(0)
        return (await opened).session_id, value(await step)

    assert asyncio.run(scenario()) == ("b", 3.0)


def test_a_refused_step_raises_the_peers_error_and_the_channel_goes_on() -> None:
    async def scenario() -> float:
        peer = Peer()
        channel = PeerChannel("ws://peer", peer, timeout=5.0)  # type: ignore[arg-type]
        refused = asyncio.ensure_future(channel.step(a_step(channel, "a", 1.0)))
        await asyncio.sleep(0.01)
        peer.answer(0, Error(code="too_large", message="frame too large", step_id=0))
        with pytest.raises(RemoteError) as caught:
            await refused
        assert caught.value.code == "too_large" and channel.alive
        following = asyncio.ensure_future(channel.step(a_step(channel, "a", 5.0)))
        await asyncio.sleep(0.01)
        peer.echo(1)
        return value(await following)

    assert asyncio.run(scenario()) == 5.0


def test_a_dropped_connection_fails_every_waiting_request() -> None:
    async def scenario() -> list[bool]:
        peer = Peer()
        channel = PeerChannel("ws://peer", peer, timeout=5.0)  # type: ignore[arg-type]
        waiting = [asyncio.ensure_future(channel.step(a_step(channel, s, 1.0))) for s in ("a", "b")]
        await asyncio.sleep(0.01)
        peer.drop()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        return [isinstance(outcome, PeerUnreachableError) for outcome in outcomes] + [channel.alive]

    assert asyncio.run(scenario()) == [True, True, False]


def test_a_reply_that_answers_nothing_breaks_the_channel() -> None:
    async def scenario() -> bool:
        peer = Peer()
        channel = PeerChannel("ws://peer", peer, timeout=5.0)  # type: ignore[arg-type]
        waiting = asyncio.ensure_future(channel.step(a_step(channel, "a", 1.0)))
        await asyncio.sleep(0.01)
        peer.answer(0, StepResult(step_id=99, hidden=WireTensor.from_torch(torch.zeros(1, 1, 4))))
        with pytest.raises(PeerUnreachableError):
            await waiting
        return channel.alive

    assert asyncio.run(scenario()) is False
