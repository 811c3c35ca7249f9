"""One link of a chain: a session on one peer over a range of layers, and what each of its steps was sent.

The client stays in the middle of every hop (client -> A -> client -> B ...), so it holds what each link was
sent (its history); `failover.py` replays that history onto a replacement when the link is lost.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch

from swarm.client.core.channel import ChannelPool, PeerChannel
from swarm.client.core.tuning import LowRankAdapter
from swarm.errors import ErrorCode, ProtocolError, RemoteError
from swarm.protocol import (
    CloseSession,
    Codec,
    OpenSession,
    PeerInfo,
    RelayHop,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
    WireTensor,
)
from swarm.routing import Link
from swarm.tensors import WIRE_DTYPES

log = logging.getLogger("swarm.client")

STEP_TIMEOUT = 300.0


def wire_hidden(hidden: torch.Tensor, peer_dtype: str, codec: Codec = "raw") -> WireTensor:
    """Hidden states in the dtype the peer computes in, so it never converts them again."""
    return WireTensor.from_torch(hidden.to(WIRE_DTYPES[peer_dtype]), codec)


def wire_mask(mask: torch.Tensor) -> WireTensor | None:
    """An attention mask as it travels: a mask of only ones travels as none at all."""
    return None if bool(mask.all()) else WireTensor.from_torch(mask)


@dataclass(frozen=True)
class LinkInputs:
    """One step as sent to a link (positions int64, mask bool); kept as history for replay after a failover.

    `wire` holds the positions, mask and beam reorder as they travel, encoded once for every link of the chain
    (only the hidden states differ from link to link)."""

    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    hypo_ids: torch.Tensor | None
    wire: WireInputs | None = None

    def following(self, hidden: torch.Tensor) -> LinkInputs:
        """The same step as the next link gets it: the same positions, this link's output."""
        return LinkInputs(hidden, self.position_ids, self.attention_mask, self.hypo_ids, self.encoded())

    def encoded(self) -> WireInputs:
        return self.wire if self.wire is not None else WireInputs.of(self)

    def compact(self) -> LinkInputs:
        """The same step in tensors of its own wherever it holds a view (a session's rows of a group's tensors):
        history lives as long as the session, and a view would keep every other row of the group alive."""
        return LinkInputs(
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
    def of(cls, inputs: LinkInputs) -> WireInputs:
        return cls(
            WireTensor.from_torch(inputs.position_ids),
            wire_mask(inputs.attention_mask),
            WireTensor.from_torch(inputs.hypo_ids) if inputs.hypo_ids is not None else None,
        )


def checked_output(output: torch.Tensor, inputs: torch.Tensor, address: str) -> torch.Tensor:
    """A link's output, if it can be one: the shape of its input and finite. Anything else is a broken or lying
    peer, which loses the link (`ProtocolError` fails over and bans it) instead of failing the caller."""
    if output.shape != inputs.shape:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{address} answered hidden states of shape {list(output.shape)} for {list(inputs.shape)}",
        )
    if not bool(torch.isfinite(output).all()):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{address} answered hidden states that are not finite")
    return output


def check_peer(answered: PeerInfo | None, named: PeerInfo, address: str) -> None:
    """The node that answered the handshake at `address` must be the peer the registry named there, serving the
    same checkpoint and layers: otherwise the address was announced by someone else, or the node changed."""
    if answered is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{address} did not say which node it is")
    same = (answered.peer_id, answered.model_id, answered.weights, answered.start, answered.end) == (
        named.peer_id,
        named.model_id,
        named.weights,
        named.start,
        named.end,
    )
    if not same:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{address} is node {answered.peer_id} serving [{answered.start}, {answered.end}), not the peer "
            f"{named.peer_id} the registry listed there",
        )


def _own(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size() else tensor


class LinkSession:
    """A session on one peer over layers [start, end), on the channel this client shares with every other
    session it holds on that peer.

    Hidden states go out in `codec` (which the peer must advertise); the peer answers in the same one."""

    def __init__(
        self,
        link: Link,
        channel: PeerChannel,
        session_id: str,
        codec: Codec = "raw",
        adapter: LowRankAdapter | None = None,
        relay_key: str | None = None,
    ) -> None:
        self.link = link
        self.adapter = adapter
        self.relay_key = relay_key
        """Lets the previous peer of the chain send this session's steps (node-to-node forwarding)."""
        """The adapter the session runs with (its pairs for this link's layers went with `open_session`)."""
        self.channel = channel
        self.session_id = session_id
        self.codec = codec
        self.history: list[LinkInputs] = []
        self.keep: int | None = None
        """Tokens the peer's session is to keep before the next step (`cut`: rejected speculative tokens)."""
        self.reordered = False
        """Some step reordered the rows (beam search's `hypo_ids`): the history is not one sequence per row."""

    @classmethod
    async def open(
        cls,
        link: Link,
        max_length: int,
        batch_size: int,
        channels: ChannelPool,
        codec: Codec = "raw",
        adapter: LowRankAdapter | None = None,
    ) -> LinkSession:
        channel = await channels.get(link.peer.address)
        check_peer(channel.node, link.peer, link.peer.address)
        session_id = secrets.token_hex(8)
        relay_key = secrets.token_hex(16)
        message = OpenSession(
            session_id=session_id,
            start=link.start,
            end=link.end,
            max_length=max_length,
            batch_size=batch_size,
            adapter=adapter.wire(link.start, link.end) if adapter is not None else None,
            relay_key=relay_key,
        )
        await channel.request(message, SessionOpened, timeout=STEP_TIMEOUT)
        return cls(link, channel, session_id, codec, adapter, relay_key)

    @property
    def length(self) -> int:
        """Tokens the peer's session holds (once a pending `cut` is sent)."""
        return sum(past.hidden.shape[1] for past in self.history)

    def cut(self, tokens: int) -> None:
        """Forget the last `tokens` tokens sent (rejected speculative tokens): from the history at once, from the
        peer's session with the next step (`Step.lengths`). A replacement after a failover replays the history
        as it is then, so it never holds them."""
        while tokens > 0 and self.history:
            last = self.history[-1]
            width = last.hidden.shape[1]
            if width <= tokens:
                self.history.pop()
                tokens -= width
                continue
            keep = width - tokens
            self.history[-1] = LinkInputs(
                last.hidden[:, :keep].clone(),
                last.position_ids[:, :keep].clone(),
                last.attention_mask[:, :keep].clone(),
                last.hypo_ids,
            )
            tokens = 0
        self.keep = self.length

    async def step(self, inputs: LinkInputs) -> torch.Tensor:
        reply = await self.channel.step(self.step_message(inputs, self.channel.next_step_id()))
        return self.accept(reply, inputs)

    def step_message(self, inputs: LinkInputs, step_id: int, relay: list[RelayHop] | None = None) -> Step:
        """This link's step for `inputs` (with `relay`: to go on through the rest of the chain)."""
        wire = inputs.encoded()
        return Step.trusted(
            type="step",
            step_id=step_id,
            session_ids=[self.session_id],
            rows=[inputs.hidden.shape[0]],
            hidden=wire_hidden(inputs.hidden, self.link.peer.dtype, self.codec),
            position_ids=wire.position_ids,
            attention_mask=wire.attention_mask,
            hypo_ids=wire.hypo_ids,
            lengths=[self.keep] if self.keep is not None else None,
            relay=relay,
        )

    def relay_hop(self, step_id: int) -> RelayHop:
        """This link as a later hop of a forwarded step, answering as `step_id` on this client's channel."""
        assert self.relay_key is not None
        return RelayHop.trusted(
            address=self.channel.address,
            session_id=self.session_id,
            relay_key=self.relay_key,
            step_id=step_id,
            length=self.keep,
        )

    def accept(self, reply: StepResult, inputs: LinkInputs) -> torch.Tensor:
        """The link's output from its answer to `inputs`, recorded as its history."""
        if reply.errors is not None and reply.errors[0] is not None:
            raise RemoteError(reply.errors[0].code, reply.errors[0].message, self.channel.address)
        output = checked_output(reply.hidden.to_torch(), inputs.hidden, self.channel.address)
        self.keep = None
        self.record(inputs)
        return output

    def record(self, inputs: LinkInputs) -> None:
        """Keep a step this link has taken, to replay it onto a replacement after a failover."""
        self.history.append(inputs.compact())
        self.reordered = self.reordered or inputs.hypo_ids is not None

    async def close(self) -> None:
        if not self.channel.alive:  # the peer freed the session with the connection
            return
        try:
            await self.channel.request(CloseSession(session_id=self.session_id), SessionClosed, timeout=5.0)
        except Exception as exc:  # best effort: the node frees the session when the socket drops anyway
            log.debug("closing session on %s: %s", self.link.peer.address, exc)
