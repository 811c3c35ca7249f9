"""A stateless pass through the swarm (scoring, plain `model(input_ids)`): no cache anywhere.

Nothing to rebuild on failure, so a failed peer is banned and the whole pass is re-planned."""

from __future__ import annotations

import logging

import torch

from swarm.client.core.failover import LINK_FAILURES, MAX_FAILOVERS_PER_STEP, worth_failing_over
from swarm.client.core.links import STEP_TIMEOUT, wire_hidden
from swarm.client.core.planner import ChainPlanner
from swarm.errors import SwarmError
from swarm.protocol import Codec, Forward, ForwardResult, WireTensor
from swarm.routing import Link
from swarm.transport import Credentials, open_connection, request

log = logging.getLogger("swarm.client")


async def forward_through(
    planner: ChainPlanner,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The last layer's hidden states for `hidden`, through a chain planned for this pass alone."""
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
        except LINK_FAILURES as exc:
            if not worth_failing_over(exc):
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
