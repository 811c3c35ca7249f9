"""Sending hidden states through a chain of peers: stateful sessions and stateless forwards.

The client stays in the middle of every hop (client -> A -> client -> B ...), so it holds what each
link was sent (its history). When a link fails, `ChainSession` bans the peer, finds peers for
exactly the failed layers, replays the history there to rebuild their caches, and carries on: the
output is the same as if nothing had failed.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch
from swarm.client.core.channel import ChannelPool, PeerChannel
from swarm.client.core.planner import ChainPlanner, describe_chain

from swarm.errors import (
    MissingLayersError,
    PeerUnreachableError,
    RemoteError,
    SwarmError,
    SwarmFullError,
    format_layer_range,
)
from swarm.protocol import (
    WIRE_DTYPES,
    CloseSession,
    Codec,
    Forward,
    ForwardResult,
    OpenSession,
    SessionClosed,
    SessionOpened,
    Step,
    WireTensor,
)
from swarm.routing import Link
from swarm.transport import Credentials, open_connection, request

log = logging.getLogger("swarm.client")

STEP_TIMEOUT = 300.0
MAX_FAILOVERS_PER_STEP = 8

LinkFailure = (PeerUnreachableError, RemoteError)
RETRYABLE_CODES = frozenset({"busy", "internal", "unknown_session"})
"""Error codes after which another peer may well succeed (full, draining, crashed, restarted)."""


def wire_hidden(hidden: torch.Tensor, peer_dtype: str, codec: Codec = "raw") -> WireTensor:
    """Hidden states in the dtype the peer computes in, so it never converts them again."""
    return WireTensor.from_torch(hidden.to(WIRE_DTYPES[peer_dtype]), codec)


@dataclass(frozen=True)
class StepInputs:
    """One step as sent to a link (positions int64, mask bool); kept as history for replay after a failover.

    `wire` holds the positions, mask and beam reorder as they travel, encoded once for every link of the chain
    (only the hidden states differ from link to link); a mask of only ones travels as none at all."""

    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    hypo_ids: torch.Tensor | None
    wire: WireInputs | None = None

    def following(self, hidden: torch.Tensor) -> StepInputs:
        """The same step as the next link gets it: the same positions, this link's output."""
        return StepInputs(hidden, self.position_ids, self.attention_mask, self.hypo_ids, self.encoded())

    def encoded(self) -> WireInputs:
        return self.wire if self.wire is not None else WireInputs.of(self)

    def compact(self) -> StepInputs:
        """The same step in tensors of its own wherever it holds a view (a session's rows of a group's tensors):
        history lives as long as the session, and a view would keep every other row of the group alive."""
        return StepInputs(
            _own(self.hidden),
            _own(self.position_ids),
            _own(self.attention_mask),
            _own(self.hypo_ids) if self.hypo_ids is not None else None,
        )


@dataclass(frozen=True)
class WireInputs:
    position_ids: WireTensor
    attention_mask: WireTensor | None
    hypo_ids: WireTensor | None

    @classmethod
    def of(cls, inputs: StepInputs) -> WireInputs:
        mask = inputs.attention_mask
        return cls(
            WireTensor.from_torch(inputs.position_ids),
            None if bool(mask.all()) else WireTensor.from_torch(mask),
            WireTensor.from_torch(inputs.hypo_ids) if inputs.hypo_ids is not None else None,
        )


def _own(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size() else tensor


class LinkSession:
    """One link of a chain: a session on one peer over layers [start, end), on the channel this client
    shares with every other session it holds on that peer.

    Hidden states go out in `codec` (which the peer must advertise); the peer answers in the same one."""

    def __init__(self, link: Link, channel: PeerChannel, session_id: str, codec: Codec = "raw") -> None:
        self.link = link
        self.channel = channel
        self.session_id = session_id
        self.codec = codec
        self.history: list[StepInputs] = []

    @classmethod
    async def open(
        cls, link: Link, max_length: int, batch_size: int, channels: ChannelPool, codec: Codec = "raw"
    ) -> LinkSession:
        channel = await channels.get(link.peer.address)
        session_id = secrets.token_hex(8)
        message = OpenSession(
            session_id=session_id, start=link.start, end=link.end, max_length=max_length, batch_size=batch_size
        )
        await channel.request(message, SessionOpened, timeout=STEP_TIMEOUT)
        return cls(link, channel, session_id, codec)

    async def step(self, inputs: StepInputs) -> torch.Tensor:
        wire = inputs.encoded()
        message = Step.trusted(
            type="step",
            step_id=self.channel.next_step_id(),
            session_ids=[self.session_id],
            rows=[inputs.hidden.shape[0]],
            hidden=wire_hidden(inputs.hidden, self.link.peer.dtype, self.codec),
            position_ids=wire.position_ids,
            attention_mask=wire.attention_mask,
            hypo_ids=wire.hypo_ids,
        )
        reply = await self.channel.step(message)
        if reply.errors is not None and reply.errors[0] is not None:
            raise RemoteError(reply.errors[0].code, reply.errors[0].message, self.channel.address)
        self.record(inputs)
        return reply.hidden.to_torch()

    def record(self, inputs: StepInputs) -> None:
        """Keep a step this link has taken, to replay it onto a replacement after a failover."""
        self.history.append(inputs.compact())

    async def close(self) -> None:
        if not self.channel.alive:  # the peer freed the session with the connection
            return
        try:
            await self.channel.request(CloseSession(session_id=self.session_id), SessionClosed, timeout=5.0)
        except Exception as exc:  # best effort: the node frees the session when the socket drops anyway
            log.debug("closing session on %s: %s", self.link.peer.address, exc)


class ChainSession:
    """A session over a whole chain of links that survives the loss of any of them."""

    def __init__(self, planner: ChainPlanner, channels: ChannelPool, max_length: int, batch_size: int) -> None:
        self.planner = planner
        self.channels = channels
        self.max_length = max_length
        self.batch_size = batch_size
        self.links: list[LinkSession] = []

    @classmethod
    async def open(cls, planner: ChainPlanner, channels: ChannelPool, max_length: int, batch_size: int) -> ChainSession:
        session = cls(planner, channels, max_length, batch_size)
        try:
            session.links = await session._open_span(0, planner.num_layers, history=[], wait=False)
        except BaseException:
            await session.close()
            raise
        return session

    async def step(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = StepInputs(
            hidden, position_ids.long(), attention_mask.bool(), hypo_ids.long() if hypo_ids is not None else None
        )
        index = 0
        while index < len(self.links):
            inputs = inputs.following(await self.step_link(index, inputs))
            index += 1
        return inputs.hidden

    async def step_link(self, index: int, inputs: StepInputs, failure: Exception | None = None) -> torch.Tensor:
        """Link `index`'s output for `inputs`, failing over as often as it takes. `failure`: how this very step
        already failed on that link (sent in a group), so it fails over before trying again."""
        for _ in range(MAX_FAILOVERS_PER_STEP):
            if failure is not None:
                if not _worth_failing_over(failure):
                    raise failure
                await self._replace(index, failure)
            try:
                return await self.links[index].step(inputs)
            except LinkFailure as exc:
                failure = exc
        raise SwarmError(
            f"gave up on layers [{self.links[index].link.start}, {self.links[index].link.end}) "
            f"after {MAX_FAILOVERS_PER_STEP} failovers in one step"
        )

    async def _replace(self, index: int, failure: Exception) -> None:
        """Swap link `index` for peers covering exactly its layers, rebuilt from its history.

        The first replacement takes the failed link's place, so the caller retries the step there."""
        failed = self.links[index]
        self.planner.ban(failed.link.peer.peer_id)
        log.info(
            "link %s [%d, %d) failed (%s); failing over, replaying %d step(s)",
            failed.link.peer.address,
            failed.link.start,
            failed.link.end,
            failure,
            len(failed.history),
        )
        await failed.close()
        replacements = await self._open_span(failed.link.start, failed.link.end, failed.history)
        self.links[index : index + 1] = replacements

    async def _open_span(self, start: int, end: int, history: list[StepInputs], wait: bool = True) -> list[LinkSession]:
        """Open sessions covering layers [start, end) and replay `history` through them.

        A failover (`wait`) gives missing peers time to come back; a new session fails fast instead."""
        needed = self.batch_size * self.max_length
        refused: list[str] = []
        for _ in range(MAX_FAILOVERS_PER_STEP):
            try:
                if wait:
                    chain = await self.planner.wait_for_chain(start, end, needed)
                else:
                    chain = await self.planner.plan(start, end, needed)
            except MissingLayersError as exc:
                if refused:
                    raise SwarmFullError(
                        f"the swarm is full for layers {format_layer_range(start, end)} of {self.planner.model_name}: "
                        f"{', '.join(refused)} refused a session of {needed} cache tokens. Try again later, use a "
                        f"shorter max_length, or start more nodes."
                    ) from exc
                raise
            opened: list[LinkSession] = []
            culprit = chain[0].peer
            try:
                for link in chain:
                    culprit = link.peer
                    codec = self.planner.codec_for(link.peer)
                    opened.append(await LinkSession.open(link, self.max_length, self.batch_size, self.channels, codec))
                for past in history:
                    hidden = past.hidden
                    for session in opened:
                        culprit = session.link.peer
                        hidden = await session.step(past.following(hidden))
            except LinkFailure as exc:
                if not _worth_failing_over(exc):
                    raise
                self.planner.ban(culprit.peer_id)
                if isinstance(exc, RemoteError) and exc.code == "busy":
                    refused.append(culprit.address)
                log.info("could not use %s for layers [%d, %d): %s", culprit.address, start, end, exc)
                for session in opened:
                    await session.close()
                continue
            if history:
                log.info("layers [%d, %d) now served by %s", start, end, describe_chain(chain))
            return opened
        raise SwarmError(f"could not open a session for layers [{start}, {end}) after {MAX_FAILOVERS_PER_STEP} tries")

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        self.links = []


def _worth_failing_over(exc: Exception) -> bool:
    """Lost peers and refusals move to another peer; a malformed request would fail anywhere."""
    return not isinstance(exc, RemoteError) or exc.code in RETRYABLE_CODES


async def forward_through(
    planner: ChainPlanner,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """A stateless pass through the swarm (scoring, plain `model(input_ids)`): no cache anywhere.

    Nothing to rebuild on failure, so a failed peer is banned and the whole pass is re-planned."""
    positions = WireTensor.from_torch(position_ids.long())
    mask = WireTensor.from_torch(attention_mask.bool())
    for _ in range(MAX_FAILOVERS_PER_STEP):
        chain = await planner.plan()
        current, link = hidden, chain[0]
        try:
            for link in chain:
                codec = planner.codec_for(link.peer)
                current = await _forward_link(link, current, positions, mask, planner.credentials, codec)
            return current
        except LinkFailure as exc:
            if not _worth_failing_over(exc):
                raise
            planner.ban(link.peer.peer_id)
            log.info("forward through %s failed (%s); re-planning", link.peer.address, exc)
    raise SwarmError(f"gave up on a forward pass after {MAX_FAILOVERS_PER_STEP} failed peers")


async def _forward_link(
    link: Link,
    hidden: torch.Tensor,
    positions: WireTensor,
    mask: WireTensor,
    credentials: Credentials,
    codec: Codec = "raw",
) -> torch.Tensor:
    connection, _ = await open_connection(link.peer.address, credentials, agent="swarm-client")
    async with connection:
        message = Forward.trusted(
            type="forward",
            start=link.start,
            end=link.end,
            hidden=wire_hidden(hidden, link.peer.dtype, codec),
            position_ids=positions,
            attention_mask=mask,
        )
        reply = await request(connection, message, ForwardResult, timeout=STEP_TIMEOUT, peer=link.peer.address)
    return reply.hidden.to_torch()
