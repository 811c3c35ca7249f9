"""Sending hidden states through a chain of peers: stateful sessions and stateless forwards.

The client stays in the middle of every hop (client -> A -> client -> B ...), so it always holds
what each link was sent, and the decode loop reads top to bottom: embed, hop, hop, head.
"""

from __future__ import annotations

import itertools
import logging
import secrets

import torch
from websockets.asyncio.client import ClientConnection

from swarm.protocol import (
    WIRE_DTYPES,
    CloseSession,
    Forward,
    ForwardResult,
    OpenSession,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
    WireTensor,
)
from swarm.routing import Link
from swarm.transport import open_connection, request

log = logging.getLogger("swarm.client")

STEP_TIMEOUT = 300.0


def wire_hidden(hidden: torch.Tensor, peer_dtype: str) -> WireTensor:
    """Hidden states in the dtype the peer computes in, so it never converts them again."""
    return WireTensor.from_torch(hidden.to(WIRE_DTYPES[peer_dtype]))


class LinkSession:
    """One link of a chain: a session on one peer over layers [start, end), on its own connection."""

    def __init__(self, link: Link, connection: ClientConnection, session_id: str) -> None:
        self.link = link
        self.connection = connection
        self.session_id = session_id
        self._step_ids = itertools.count()

    @classmethod
    async def open(cls, link: Link, max_length: int, batch_size: int, token: str | None) -> LinkSession:
        connection, _ = await open_connection(link.peer.address, token, agent="swarm-client")
        session_id = secrets.token_hex(8)
        try:
            message = OpenSession(
                session_id=session_id, start=link.start, end=link.end, max_length=max_length, batch_size=batch_size
            )
            await request(connection, message, SessionOpened, timeout=STEP_TIMEOUT, peer=link.peer.address)
        except BaseException:
            await connection.close()
            raise
        return cls(link, connection, session_id)

    async def step(
        self,
        hidden: torch.Tensor,
        position_ids: WireTensor,
        attention_mask: WireTensor,
        hypo_ids: WireTensor | None,
    ) -> torch.Tensor:
        message = Step.model_construct(
            type="step",
            session_id=self.session_id,
            step_id=next(self._step_ids),
            hidden=wire_hidden(hidden, self.link.peer.dtype),
            position_ids=position_ids,
            attention_mask=attention_mask,
            hypo_ids=hypo_ids,
        )
        reply = await request(self.connection, message, StepResult, timeout=STEP_TIMEOUT, peer=self.link.peer.address)
        return reply.hidden.to_torch()

    async def close(self) -> None:
        try:
            message = CloseSession(session_id=self.session_id)
            await request(self.connection, message, SessionClosed, timeout=5.0, peer=self.link.peer.address)
        except Exception as exc:  # closing is best effort: the node frees the session when the socket drops
            log.debug("closing session on %s: %s", self.link.peer.address, exc)
        finally:
            await self.connection.close()


class ChainSession:
    """A session over a whole chain: every step goes through each link in order."""

    def __init__(self, links: list[LinkSession], batch_size: int, max_length: int) -> None:
        self.links = links
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    async def open(cls, chain: list[Link], max_length: int, batch_size: int, token: str | None) -> ChainSession:
        opened: list[LinkSession] = []
        try:
            for link in chain:
                opened.append(await LinkSession.open(link, max_length, batch_size, token))
        except BaseException:
            for session in opened:
                await session.close()
            raise
        return cls(opened, batch_size, max_length)

    async def step(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        positions = WireTensor.from_torch(position_ids.long())
        mask = WireTensor.from_torch(attention_mask.bool())
        hypos = WireTensor.from_torch(hypo_ids.long()) if hypo_ids is not None else None
        for link in self.links:
            hidden = await link.step(hidden, positions, mask, hypos)
        return hidden

    async def close(self) -> None:
        for link in self.links:
            await link.close()


async def forward_chain(
    chain: list[Link],
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token: str | None,
) -> torch.Tensor:
    """A stateless pass through the chain (scoring, plain `model(input_ids)`): no cache anywhere."""
    positions = WireTensor.from_torch(position_ids.long())
    mask = WireTensor.from_torch(attention_mask.bool())
    for link in chain:
        connection, _ = await open_connection(link.peer.address, token, agent="swarm-client")
        async with connection:
            message = Forward.model_construct(
                type="forward", start=link.start, end=link.end, hidden=wire_hidden(hidden, link.peer.dtype),
                position_ids=positions, attention_mask=mask,
            )
            reply = await request(connection, message, ForwardResult, timeout=STEP_TIMEOUT, peer=link.peer.address)
        hidden = reply.hidden.to_torch()
    return hidden
