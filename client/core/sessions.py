"""A session over a whole chain of links: one step goes through every link in turn, failing over as it must."""

from __future__ import annotations

import asyncio
import time

import torch

from swarm.client.core.channel import ChannelPool
from swarm.client.core.failover import LINK_FAILURES, MAX_FAILOVERS_PER_STEP, SpanBuilder, worth_failing_over
from swarm.client.core.forwarding import forwarded_step
from swarm.client.core.links import LinkInputs, LinkSession
from swarm.client.core.planner import ChainPlanner
from swarm.client.core.tuning import LowRankAdapter
from swarm.client.core.verify import Verifier
from swarm.errors import PeerLiedError, SwarmError


class ChainSession:
    """A session over a whole chain of links that survives the loss of any of them (see `failover.py`)."""

    def __init__(
        self,
        planner: ChainPlanner,
        channels: ChannelPool,
        max_length: int,
        batch_size: int,
        verifier: Verifier | None = None,
        adapter: LowRankAdapter | None = None,
    ) -> None:
        self.planner = planner
        self.max_length = max_length
        self.batch_size = batch_size
        self.spans = SpanBuilder(planner, channels, max_length, batch_size, adapter)
        self.verifier = verifier or Verifier(planner)
        self.links: list[LinkSession] = []

    @classmethod
    async def open(
        cls,
        planner: ChainPlanner,
        channels: ChannelPool,
        max_length: int,
        batch_size: int,
        verifier: Verifier | None = None,
        adapter: LowRankAdapter | None = None,
    ) -> ChainSession:
        """A session over every layer; with `adapter`, each peer runs its pairs for the layers it serves."""
        session = cls(planner, channels, max_length, batch_size, verifier, adapter)
        try:
            session.links = await session.spans.open(0, planner.num_layers, history=[], wait=False)
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
        inputs = LinkInputs(
            hidden, position_ids.long(), attention_mask.bool(), hypo_ids.long() if hypo_ids is not None else None
        )
        if self.planner.forwarding and len(self.links) > 1:
            return await forwarded_step(self, inputs)
        return await self.step_from(0, inputs)

    async def step_from(self, index: int, inputs: LinkInputs, failure: Exception | None = None) -> torch.Tensor:
        """The step from link `index` on, the client in the middle of every link (`failure`: how it already
        failed at link `index`)."""
        while index < len(self.links):
            inputs = inputs.following(await self.step_link(index, inputs, failure))
            failure = None
            index += 1
        return inputs.hidden

    def cut(self, tokens: int) -> None:
        """Forget the last `tokens` tokens on every link (speculative tokens the client rejected)."""
        for link in self.links:
            link.cut(tokens)

    async def step_link(self, index: int, inputs: LinkInputs, failure: Exception | None = None) -> torch.Tensor:
        """Link `index`'s output for `inputs`, failing over as often as it takes. `failure`: how this very step
        already failed on that link (sent in a group), so it fails over before trying again."""
        for _ in range(MAX_FAILOVERS_PER_STEP):
            if failure is not None:
                if not worth_failing_over(failure):
                    raise failure
                await self.spans.replace(self.links, index, failure)
            began = time.monotonic()
            try:
                output = await self.links[index].step(inputs)
            except LINK_FAILURES as exc:
                failure = exc
                continue
            self.observe_compute(index, inputs, time.monotonic() - began)
            return await self.verified(index, output)
        raise SwarmError(
            f"gave up on layers [{self.links[index].link.start}, {self.links[index].link.end}) "
            f"after {MAX_FAILOVERS_PER_STEP} failovers in one step"
        )

    def observe_compute(self, index: int, inputs: LinkInputs, waited: float, trips: float | None = None) -> None:
        """Link `index` answered a step `waited` seconds after it could start (sent to it, or the previous link's
        answer for a forwarded step); what the trips (`trips`, by default the round trip the client measured to it)
        do not explain is compute, which route planning then believes over the peer's announced throughput. Only
        one-token steps count: they are the ones a chain's cost per token is made of."""
        if inputs.hidden.shape[1] != 1:
            return
        link = self.links[index].link
        if trips is None:
            self.planner.observe_answer(link.peer.peer_id, link.end - link.start, waited)
        else:
            self.planner.observe_compute(link.peer.peer_id, link.end - link.start, waited - trips)

    def checks(self, index: int) -> bool:
        """Whether link `index`'s latest step is to be checked on other peers; a peer that answered without a check
        counts as one this client has seen answer."""
        link = self.links[index]
        if self.verifier.wants(link):
            return True
        self.planner.proven.add(link.link.peer.peer_id)
        return False

    async def verified(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """Link `index`'s answer to the step it just took, checked by other peers when the verifier samples it
        (`verify.py`). A link caught lying fails over (its history, this step included, replayed elsewhere) and
        the honest answer is returned."""
        return await self.check(index, output) if self.checks(index) else output

    async def check(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """`verified` for a step already chosen for checking."""
        link = self.links[index]
        verdict = await self.verifier.check(link, output)
        if verdict.liar:
            await self.spans.replace(self.links, index, PeerLiedError(link.link.peer.address))
        return verdict.output

    async def close(self) -> None:
        """Close every link's session at once (each waits for its peer's answer: over a WAN, a round trip)."""
        links, self.links = self.links, []
        await asyncio.gather(*(link.close() for link in links))
