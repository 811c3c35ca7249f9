"""`step_together`: sessions at the same layers of the same peer step in one group frame, and each still gets
exactly its own result, its own history and its own error."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from client import group
from client.group import step_together
from client.session import ChainSession, LinkSession
from swarm.errors import RemoteError
from swarm.protocol import Error, Step, StepGroup, StepGroupResult, StepResult, WireTensor
from swarm.routing import Link
from tests.swarm.test_routing import peer

HIDDEN = 4


@dataclass
class FakeChannel:
    """A peer whose layers add `offset` to the hidden states; `refuse` names sessions whose steps it rejects."""

    address: str
    offset: float
    version: int = 2
    refuse: set[str] = field(default_factory=set)
    groups: list[list[str]] = field(default_factory=list)
    singles: list[str] = field(default_factory=list)

    @property
    def takes_groups(self) -> bool:
        return self.version >= 2

    async def step_group(self, group: StepGroup) -> StepGroupResult:
        self.groups.append(list(group.session_ids))
        hidden = group.hidden.to_torch() + self.offset
        errors: list[Error | None] = []
        first = 0
        for session_id, rows in zip(group.session_ids, group.rows, strict=True):
            if session_id in self.refuse:
                hidden[first : first + rows] = 0
                errors.append(Error(code="bad_request", message="refused", session_id=session_id))
            else:
                errors.append(None)
            first += rows
        return StepGroupResult(hidden=WireTensor.from_torch(hidden), errors=errors)

    async def step(self, step: Step) -> StepResult:
        self.singles.append(step.session_id)
        if step.session_id in self.refuse:
            raise RemoteError("bad_request", "refused", self.address)
        hidden = WireTensor.from_torch(step.hidden.to_torch() + self.offset)
        return StepResult(session_id=step.session_id, step_id=step.step_id, hidden=hidden)


def chain(name: str, channels: list[FakeChannel], rows: int = 1) -> ChainSession:
    session = ChainSession(planner=None, channels=None, max_length=16, batch_size=rows)  # type: ignore[arg-type]
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
    assert first.groups == [["x-0", "y-0", "z-0"]] and second.groups == [["x-1", "y-1", "z-1"]]
    assert first.singles == second.singles == []
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
    assert second.groups == [["x-1", "z-1"]]
    assert sessions[1].links[0].history == [] and sessions[1].links[1].history == []


def test_sessions_on_different_peers_or_version_1_peers_step_alone() -> None:
    shared, own, old = FakeChannel("a", 1.0), FakeChannel("b", 2.0), FakeChannel("c", 3.0, version=1)
    sessions = [chain("x", [shared, own]), chain("y", [shared, old]), chain("z", [shared, old])]
    hidden = torch.randn(3, 1, HIDDEN)
    outputs = step(sessions, hidden)
    torch.testing.assert_close(torch.cat(outputs), hidden + torch.tensor([3.0, 4.0, 4.0])[:, None, None])  # type: ignore[arg-type]
    assert shared.groups == [["x-0", "y-0", "z-0"]]
    assert own.singles == ["x-1"] and sorted(old.singles) == ["y-1", "z-1"] and old.groups == []


def test_groups_larger_than_a_frame_allows_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group, "MAX_STEPS_PER_FRAME", 2)
    first = FakeChannel("a", 1.0)
    sessions = [chain(name, [first]) for name in "vwxyz"]
    hidden = torch.randn(5, 1, HIDDEN)
    torch.testing.assert_close(torch.cat(step(sessions, hidden)), hidden + 1.0)  # type: ignore[arg-type]
    assert first.groups == [["v-0", "w-0"], ["x-0", "y-0"], ["z-0"]]
    assert first.singles == []
