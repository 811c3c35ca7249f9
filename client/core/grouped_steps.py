"""One decode step of many sessions at once, sent as one step frame per peer and layer range.

`DecodeScheduler`'s jobs decode in lockstep: every tick, each of their sessions sends one token's hidden states
through its chain. Sessions whose next link is the same layer range on the same peer travel together in one
`step` frame: one tensor to encode and send for all of them, one for the peer to check and answer, instead of
one per session. Each session keeps its own link sessions, history and failover: whoever's step fails in a
group (the peer answered it with an error, or the frame was lost) carries on alone through
`ChainSession.step_link`, which fails over and retries exactly as a step sent alone would.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

import torch

from swarm.client.core.failover import LINK_FAILURES
from swarm.client.core.links import LinkInputs, LinkSession, checked_output, wire_hidden, wire_mask
from swarm.client.core.sessions import ChainSession
from swarm.errors import ProtocolError, RemoteError
from swarm.protocol import MAX_SESSIONS_PER_STEP, Step, WireTensor

GROUP_BYTES = 8 * 2**20
"""Sessions join a group while their hidden states fit in this many bytes (a lone session always goes): well
under a node's frame limit."""


@dataclass
class _Member:
    """A session on its way through its chain: the link it is at, and what that link gets."""

    session: ChainSession
    inputs: LinkInputs
    index: int = 0
    outcome: torch.Tensor | BaseException | None = None

    @property
    def link(self) -> LinkSession:
        return self.session.links[self.index]


async def step_together(
    sessions: list[ChainSession], hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[torch.Tensor | BaseException]:
    """One step of every session, as `session.step` would take it: session i owns the next `batch_size` rows of
    hidden [R, T, H], position_ids [R, T] and attention_mask [R, T]. Returns each session's output, or the
    exception its step ended in (the others' steps go on)."""
    position_ids, attention_mask = position_ids.long(), attention_mask.bool()
    members, first = [], 0
    for session in sessions:
        rows = slice(first, first + session.batch_size)
        first += session.batch_size
        members.append(_Member(session, LinkInputs(hidden[rows], position_ids[rows], attention_mask[rows], None)))
    while moving := [member for member in members if member.outcome is None]:
        at_link: dict[tuple[int, int, int], list[_Member]] = defaultdict(list)
        for member in moving:
            if member.index == len(member.session.links):
                member.outcome = member.inputs.hidden
                continue
            link = member.link
            at_link[(id(link.channel), link.link.start, link.link.end)].append(member)
        await asyncio.gather(*(_step_link(group) for group in at_link.values()))
    return [member.outcome for member in members]  # type: ignore[misc]


async def _step_link(members: list[_Member]) -> None:
    """Step members that are all at the same layers of the same peer: together, as one frame (or a few, see
    `GROUP_BYTES`); a lone member goes through its own session."""
    if len(members) == 1:
        await _step_alone(members[0], None)
        return
    await asyncio.gather(*(_step_group(group) for group in _frames(members)))


async def _step_group(members: list[_Member]) -> None:
    failures = await _send_group(members)
    alone = [(member, failure) for member, failure in zip(members, failures, strict=True) if failure is not None]
    await asyncio.gather(*(_step_alone(member, failure) for member, failure in alone))


def _frames(members: list[_Member]) -> list[list[_Member]]:
    """Members cut into groups a peer accepts: at most `MAX_SESSIONS_PER_STEP` sessions, and hidden states of at
    most `GROUP_BYTES` unless a single session's alone is larger."""
    groups: list[list[_Member]] = [[]]
    size = 0
    for member in members:
        hidden = member.inputs.hidden
        bytes_ = hidden.numel() * hidden.element_size()
        if groups[-1] and (len(groups[-1]) == MAX_SESSIONS_PER_STEP or size + bytes_ > GROUP_BYTES):
            groups.append([])
            size = 0
        groups[-1].append(member)
        size += bytes_
    return groups


async def _send_group(members: list[_Member]) -> list[Exception | None]:
    """One step frame for the members; returns the failure of each member's step (None: it went on)."""
    links = [member.link for member in members]
    lead = links[0]
    message = Step.trusted(
        type="step",
        step_id=lead.channel.next_step_id(),
        session_ids=[link.session_id for link in links],
        rows=[member.session.batch_size for member in members],
        hidden=wire_hidden(torch.cat([m.inputs.hidden for m in members]), lead.link.peer.dtype, lead.codec),
        position_ids=WireTensor.from_torch(torch.cat([m.inputs.position_ids for m in members])),
        attention_mask=wire_mask(torch.cat([m.inputs.attention_mask for m in members])),
    )
    try:
        reply = await lead.channel.step(message)
    except LINK_FAILURES as exc:  # the frame is lost or refused: every member's step failed on this link
        return [exc] * len(members)
    output = reply.hidden.to_torch()
    failures: list[Exception | None] = []
    answered: list[tuple[_Member, torch.Tensor]] = []
    first = 0
    errors = reply.errors if reply.errors is not None else [None] * len(members)
    for member, link, error in zip(members, links, errors, strict=True):
        rows = slice(first, first + member.session.batch_size)
        first += member.session.batch_size
        if error is not None:
            failures.append(RemoteError(error.code, error.message, lead.channel.address))
            continue
        try:
            own = checked_output(output[rows], member.inputs.hidden, lead.channel.address)
        except ProtocolError as exc:
            failures.append(exc)
            continue
        link.record(member.inputs)
        answered.append((member, own))
        failures.append(None)
    checked = [(member, own) for member, own in answered if member.session.checks(member.index)]
    verified = await asyncio.gather(
        *(member.session.check(member.index, own) for member, own in checked), return_exceptions=True
    )
    outcomes = dict(zip((id(member) for member, _ in checked), verified, strict=True))
    for member, own in answered:  # most steps are not checked: their own answer goes on
        outcome = outcomes.get(id(member), own)
        if isinstance(outcome, BaseException):  # failing over a liar failed: this session's step ends
            member.outcome = outcome
            continue
        member.inputs = member.inputs.following(outcome)
        member.index += 1
    return failures


async def _step_alone(member: _Member, failure: Exception | None) -> None:
    """A member that did not go in a group, or whose step failed there: through its own session's link."""
    try:
        output = await member.session.step_link(member.index, member.inputs, failure)
    except Exception as exc:  # ends this session's step only
        member.outcome = exc
        return
    member.inputs = member.inputs.following(output)
    member.index += 1
