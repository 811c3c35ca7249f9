"""`PeerChannel`: a step on an idle channel leaves at once; steps arriving meanwhile leave together."""

from __future__ import annotations

import asyncio

import torch

from client.channel import PeerChannel
from swarm.protocol import (
    Step,
    StepMany,
    StepManyResult,
    StepResult,
    WireTensor,
    decode_message,
    encode_message,
)


class EchoPeer:
    """Stands for a node's connection: answers each frame with the hidden states it carried, after a delay."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self._answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def send(self, frame: bytes) -> None:
        message = decode_message(frame)
        self.frames.append(message.type)
        steps = message.steps if isinstance(message, StepMany) else [message]
        results = [StepResult(session_id=s.session_id, step_id=s.step_id, hidden=s.hidden) for s in steps]
        answer = StepManyResult(results=results) if isinstance(message, StepMany) else results[0]
        await asyncio.sleep(0.02)
        await self._answers.put(encode_message(answer))

    async def recv(self) -> bytes:
        return await self._answers.get()


def a_step(session_id: str, value: float) -> Step:
    hidden = WireTensor.from_torch(torch.full((1, 1, 4), value))
    positions = WireTensor.from_torch(torch.zeros(1, 1, dtype=torch.long))
    return Step(session_id=session_id, step_id=0, hidden=hidden, position_ids=positions)


def test_a_lone_step_leaves_at_once_and_steps_arriving_meanwhile_share_the_next_frame() -> None:
    peer = EchoPeer()

    async def scenario() -> list[float]:
        channel = PeerChannel("ws://peer", peer, timeout=5.0)  # type: ignore[arg-type]
        first = asyncio.ensure_future(channel.step(a_step("a", 1.0)))
        await asyncio.sleep(0)  # the first frame is on its way
        rest = [channel.step(a_step(session, value)) for session, value in (("b", 2.0), ("c", 3.0))]
        results = await asyncio.gather(first, *rest)
        return [result.hidden.to_torch()[0, 0, 0].item() for result in results]

    assert asyncio.run(scenario()) == [1.0, 2.0, 3.0]
    assert peer.frames == ["step", "step_many"]
