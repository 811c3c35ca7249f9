"""A stateless pass through the swarm (scoring, plain `model(input_ids)`): no cache anywhere.

Nothing to rebuild on failure, so a failed peer is banned and the whole pass is re-planned."""

from __future__ import annotations

import logging

import torch
from pydantic import BaseModel

from swarm.client.core.channel import HANDSHAKE_TIMEOUT
from swarm.client.core.failover import LINK_FAILURES, MAX_FAILOVERS_PER_STEP, set_aside, worth_failing_over
from swarm.client.core.links import STEP_TIMEOUT, check_peer, checked_output, wire_hidden
from swarm.client.core.planner import ChainPlanner
from swarm.client.core.tuning import LowRankAdapter
from swarm.errors import SwarmError
from swarm.protocol import Codec, Forward, ForwardResult, WireAdapter, WireTensor
from swarm.routing import Link
from swarm.transport import Credentials, ReplyT, open_connection, request

log = logging.getLogger("swarm.client")


async def forward_through(
    planner: ChainPlanner,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    adapter: LowRankAdapter | None = None,
) -> torch.Tensor:
    """The last layer's hidden states for `hidden`, through a chain planned for this pass alone (each peer running
    `adapter`'s pairs for its layers, if there is one)."""
    for _ in range(MAX_FAILOVERS_PER_STEP):
        chain = await planner.plan(forwarded=False)
        try:
            return await forward_chain(planner, chain, hidden, position_ids, attention_mask, adapter)
        except ChainFailure as failure:
            if not worth_failing_over(failure.error):
                raise failure.error from None
            set_aside(planner, failure.link.peer.peer_id, failure.error)
            log.info("forward through %s failed (%s); re-planning", failure.link.peer.address, failure.error)
    raise SwarmError(f"gave up on a forward pass after {MAX_FAILOVERS_PER_STEP} failed peers")


class ChainFailure(Exception):
    """A stateless pass failed at `link` with `error` (one of `LINK_FAILURES`)."""

    def __init__(self, link: Link, error: Exception) -> None:
        super().__init__(f"{link.peer.address}: {error}")
        self.link = link
        self.error = error


async def forward_chain(
    planner: ChainPlanner,
    chain: list[Link],
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    adapter: LowRankAdapter | None = None,
) -> torch.Tensor:
    """`hidden` through every link of `chain` with no session; `ChainFailure` names the link that failed."""
    positions = WireTensor.from_torch(position_ids.long())
    mask = WireTensor.from_torch(attention_mask.bool())
    for link in chain:
        try:
            codec = planner.codec_for(link.peer)
            wire = adapter.wire(link.start, link.end) if adapter is not None else None
            hidden = await forward_link(link, hidden, positions, mask, planner.credentials, codec, wire)
        except LINK_FAILURES as exc:
            raise ChainFailure(link, exc) from exc
    return hidden


async def forward_link(
    link: Link,
    hidden: torch.Tensor,
    positions: WireTensor,
    mask: WireTensor,
    credentials: Credentials,
    codec: Codec = "raw",
    adapter: WireAdapter | None = None,
) -> torch.Tensor:
    """`hidden` through one link, on a connection of its own."""
    message = Forward.trusted(
        type="forward",
        start=link.start,
        end=link.end,
        hidden=wire_hidden(hidden, link.peer.dtype, codec),
        position_ids=positions,
        attention_mask=mask,
        adapter=adapter,
    )
    reply = await ask_link(link, credentials, message, ForwardResult)
    return checked_output(reply.hidden.to_torch(), hidden, link.peer.address)


async def ask_link(link: Link, credentials: Credentials, message: BaseModel, expect: type[ReplyT]) -> ReplyT:
    """One stateless request (`forward`, `backward`) to a link's peer, on a connection of its own, after checking
    that the node answering there is the peer the registry listed."""
    address = link.peer.address
    connection, welcome = await open_connection(address, credentials, agent="swarm-client", timeout=HANDSHAKE_TIMEOUT)
    async with connection:
        check_peer(welcome.node, link.peer, address)
        return await request(connection, message, expect, timeout=STEP_TIMEOUT, peer=address)
