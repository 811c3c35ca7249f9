"""`step_together`: sessions at the same layers of the same peer step in one group frame, and each still gets
exactly its own result, its own history and its own error."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from swarm.client.core import grouped_steps as group
from swarm.client.core.grouped_steps import step_together
from swarm.client.core.links import LinkSession
from swarm.client.core.planner import ChainPlanner
from swarm.client.core.sessions import ChainSession
from swarm.errors import RemoteError
from swarm.protocol import Error, Step, StepResult, WireTensor
from swarm.routing import Link
from tests.swarm.test_routing import peer

HIDDEN = 4


@dataclass
class FakeChannel:
    """A peer whose layers add `offset` to the hidden states; `refuse` names sessions whose steps it rejects.
    `frames` lists the sessions of every step frame it got."""

    address: str
    offset: float
    refuse: set[str] = field(default_factory=set)
    frames: list[list[str]] = field(default_factory=list)
    _ids: int = 0

    def next_step_id(self) -> int:
        self._ids += 1
        return self._ids

    async def step(self, message: Step) -> StepResult:
        self.frames.append(list(message.session_ids))
        hidden = message.hidden.to_torch() + self.offset
        errors: list[Error | None] = []
        first = 0
        for session_id, rows in zip(message.session_ids, message.rows, strict=True):
            if session_id in self.refuse:
                hidden[first : first + rows] = 0
                errors.append(Error(code="bad_request", message="refused"))
            else:
                errors.append(None)
            first += rows
        failed = errors.count(None) < len(errors)
        return StepResult(
            step_id=message.step_id, hidden=WireTensor.from_torch(hidden), errors=errors if failed else None
        )


def chain(name: str, channels: list[FakeChannel], rows: int = 1) -> ChainSession:
    planner = ChainPlanner(["ws://127.0.0.1:9"], "m", 8)  # verify_rate 0: no step is checked on other peers
    session = ChainSession(planner=planner, channels=None, max_length=16, batch_size=rows)  # type: ignore[arg-type]
    session.links = [
        LinkSession(Link(peer(channel.address, 0, 8), 2 * i, 2 * i + 2), channel, f"{name}-{i}")  # type: ignore[arg-type]
        for i, channel in enumerate(channels)
    ]
    return session


def step(sessions: list[ChainSession], hidden: torch.Tensor) -> list[torch.Tensor | BaseException]:
    rows = hidden.shape[0]
    positions, mask = torch.full((rows, 1), 5), torch.ones(rows, 1, dtype=torch.long)
    return asyncio.run(step_together(sessions, hidden, positions, mask))


def test_sessions_on_the_same_peers_go_as_one_group_per_link() -> None:
    first, second = FakeChannel("a", 1.0), FakeChannel("b", 10.0)
    sessions = [chain("x", [first, second]), chain("y", [first, second], rows=2), chain("z", [first, second])]
    hidden = torch.arange(4 * HIDDEN, dtype=torch.float32).reshape(4, 1, HIDDEN)
    outputs = step(sessions, hidden)
    torch.testing.assert_close(torch.cat(outputs), hidden + 11.0)  # type: ignore[arg-type]
    assert first.frames == [["x-0", "y-0", "z-0"]] and second.frames == [["x-1", "y-1", "z-1"]]
    for session, rows in zip(sessions, (slice(0, 1), slice(1, 3), slice(3, 4)), strict=True):
        history = [link.history for link in session.links]
        assert all(len(steps) == 1 for steps in history)  # kept for replay after a failover
        torch.testing.assert_close(history[0][0].hidden, hidden[rows])
        torch.testing.assert_close(history[1][0].hidden, hidden[rows] + 1.0)
        for kept in (history[0][0], history[1][0]):  # its own rows only: the group's tensors may go
            for tensor in (kept.hidden, kept.position_ids, kept.attention_mask):
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_a_refused_session_fails_alone_and_the_others_go_on() -> None:
    first, second = FakeChannel("a", 1.0, refuse={"y-0"}), FakeChannel("b", 10.0)
    sessions = [chain("x", [first, second]), chain("y", [first, second]), chain("z", [first, second])]
    hidden = torch.randn(3, 1, HIDDEN)
    x, y, z = step(sessions, hidden)
    assert isinstance(y, RemoteError) and y.code == "bad_request"
    torch.testing.assert_close(x, hidden[0:1] + 11.0)
    torch.testing.assert_close(z, hidden[2:3] + 11.0)
    assert first.frames == [["x-0", "y-0", "z-0"]] and second.frames == [["x-1", "z-1"]]
    assert sessions[1].links[0].history == [] and sessions[1].links[1].history == []


def test_a_session_alone_on_its_peer_steps_alone_and_the_others_group_per_peer() -> None:
    shared, own, other = FakeChannel("a", 1.0), FakeChannel("b", 2.0), FakeChannel("c", 3.0)
    sessions = [chain("x", [shared, own]), chain("y", [shared, other]), chain("z", [shared, other])]
    hidden = torch.randn(3, 1, HIDDEN)
    outputs = step(sessions, hidden)
    torch.testing.assert_close(torch.cat(outputs), hidden + torch.tensor([3.0, 4.0, 4.0])[:, None, None])  # type: ignore[arg-type]
    assert shared.frames == [["x-0", "y-0", "z-0"]]
    assert own.frames == [["x-1"]] and other.frames == [["y-1", "z-1"]]


def test_groups_larger_than_a_frame_allows_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group, "MAX_SESSIONS_PER_STEP", 2)
    first = FakeChannel("a", 1.0)
    sessions = [chain(name, [first]) for name in "vwxyz"]
    hidden = torch.randn(5, 1, HIDDEN)
    torch.testing.assert_close(torch.cat(step(sessions, hidden)), hidden + 1.0)  # type: ignore[arg-type]
    assert first.frames == [["v-0", "w-0"], ["x-0", "y-0"], ["z-0"]]
