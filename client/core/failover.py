"""Failover: when a link of a chain is lost, rebuild exactly its layers elsewhere so the output is unchanged.

A link fails when its peer drops (`PeerUnreachableError`), breaks the protocol (`ProtocolError`: this includes
answers that cannot be right, and answers span verification caught), or answers with a retryable error (full,
draining, crashed, restarted). The peer is banned for this client (a peer that answered `busy` only cools down:
it did nothing wrong), peers are found for exactly the failed layers (possibly several that split them), and
the link's history is replayed through them to rebuild their caches; the step that failed is then retried
there. An error that would fail anywhere (a malformed request, a wrong token) is raised instead.

Opening a span tries candidates until one chain works or none is left, within `OPEN_DEADLINE` seconds: peers
that fail are left out one by one, so fake peers announced in numbers cost one short handshake each.
"""

from __future__ import annotations

import asyncio
import logging
import time

from swarm.client.core.channel import ChannelPool
from swarm.client.core.links import LinkInputs, LinkSession
from swarm.client.core.planner import ChainPlanner, describe_chain
from swarm.client.core.tuning import LowRankAdapter
from swarm.errors import (
    ErrorCode,
    MissingLayersError,
    PeerUnreachableError,
    ProtocolError,
    RemoteError,
    SwarmError,
    SwarmFullError,
    format_layer_range,
)
from swarm.protocol import PeerInfo
from swarm.routing import Link

log = logging.getLogger("swarm.client")

MAX_FAILOVERS_PER_STEP = 8
OPEN_DEADLINE = 60.0
"""The longest opening a span may take, trying one candidate chain after another."""
MAX_OPEN_ATTEMPTS = 64

LINK_FAILURES = (PeerUnreachableError, ProtocolError, RemoteError)
"""What losing a link looks like; `worth_failing_over` says which of them another peer may not repeat."""


def worth_failing_over(exc: Exception) -> bool:
    """Lost peers, broken peers and retryable refusals move to another peer; a malformed request would fail
    anywhere."""
    return not isinstance(exc, RemoteError) or exc.retryable


def is_busy(exc: Exception) -> bool:
    return isinstance(exc, RemoteError) and exc.code is ErrorCode.BUSY


def set_aside(planner: ChainPlanner, peer_id: str, failure: Exception) -> None:
    """Keep a peer that failed out of new chains: a short cool-down after `busy`, a ban for anything else."""
    if is_busy(failure):
        planner.cool_down(peer_id)
    else:
        planner.ban(peer_id)


class SpanBuilder:
    """Opens link sessions covering a range of layers for one chain session, and fails its links over."""

    def __init__(
        self,
        planner: ChainPlanner,
        channels: ChannelPool,
        max_length: int,
        batch_size: int,
        adapter: LowRankAdapter | None = None,
    ) -> None:
        self.planner = planner
        self.channels = channels
        self.max_length = max_length
        self.batch_size = batch_size
        self.adapter = adapter
        """Every link session opens with this adapter's pairs for its layers (replacements too)."""

    async def replace(self, links: list[LinkSession], index: int, failure: Exception) -> None:
        """Swap `links[index]` for peers covering exactly its layers, rebuilt from its history.

        The first replacement takes the failed link's place, so the caller retries the step there."""
        failed = links[index]
        set_aside(self.planner, failed.link.peer.peer_id, failure)
        log.info(
            "link %s [%d, %d) failed (%s); failing over, replaying %d step(s)",
            failed.link.peer.address,
            failed.link.start,
            failed.link.end,
            failure,
            len(failed.history),
        )
        await failed.close()
        links[index : index + 1] = await self.open(failed.link.start, failed.link.end, failed.history)

    async def open(self, start: int, end: int, history: list[LinkInputs], wait: bool = True) -> list[LinkSession]:
        """Open sessions covering layers [start, end) and replay `history` through them.

        A failover (`wait`) gives missing peers time to come back; a new session fails fast instead."""
        needed = self.batch_size * self.max_length
        refused: list[str] = []
        busy: set[str] = set()  # left out of this opening only
        deadline = time.monotonic() + OPEN_DEADLINE
        for _ in range(MAX_OPEN_ATTEMPTS):
            if time.monotonic() > deadline:
                break
            try:
                if wait:
                    chain = await self.planner.wait_for_chain(start, end, needed, frozenset(busy))
                else:
                    chain = await self.planner.plan(start, end, needed, frozenset(busy))
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
                opened, culprit = await self._open_links(chain)
                for past in history:
                    hidden = past.hidden
                    for session in opened:
                        culprit = session.link.peer
                        hidden = await session.step(past.following(hidden))
            except (*LINK_FAILURES, _OpenFailed) as failed:
                exc = failed.error if isinstance(failed, _OpenFailed) else failed
                culprit = failed.peer if isinstance(failed, _OpenFailed) else culprit
                if not worth_failing_over(exc):
                    raise exc from None
                set_aside(self.planner, culprit.peer_id, exc)
                if is_busy(exc):
                    busy.add(culprit.peer_id)
                    refused.append(culprit.address)
                log.info("could not use %s for layers [%d, %d): %s", culprit.address, start, end, exc)
                for session in opened:
                    await session.close()
                continue
            if history:
                log.info("layers [%d, %d) now served by %s", start, end, describe_chain(chain))
            return opened
        raise SwarmError(f"could not open a session for layers [{start}, {end}): every candidate peer failed")

    async def _open_links(self, chain: list[Link]) -> tuple[list[LinkSession], PeerInfo]:
        """A session on every link of `chain`, opened all at once (over a WAN, one after the other would cost a
        round trip per link before the first token). If any fails, those that opened are closed and the first
        failure is raised; also returns the last link's peer (the one to blame for what follows)."""
        outcomes = await asyncio.gather(
            *(
                LinkSession.open(
                    link,
                    self.max_length,
                    self.batch_size,
                    self.channels,
                    self.planner.codec_for(link.peer),
                    self.adapter,
                )
                for link in chain
            ),
            return_exceptions=True,
        )
        opened = [outcome for outcome in outcomes if isinstance(outcome, LinkSession)]
        for link, outcome in zip(chain, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                await asyncio.gather(*(session.close() for session in opened), return_exceptions=True)
                if isinstance(outcome, LINK_FAILURES):
                    raise _OpenFailed(link.peer, outcome)
                raise outcome
        return opened, chain[-1].peer


class _OpenFailed(Exception):
    """Opening a link's session failed with `error` (one of `LINK_FAILURES`) at `peer`."""

    def __init__(self, peer: PeerInfo, error: Exception) -> None:
        super().__init__(str(error))
        self.peer = peer
        self.error = error
