"""Gradients through the swarm: a differentiable pass over the remote layers, one autograd function per hop.

A training pass plans a chain over peers that offer training (`PeerInfo.training`) and runs each link as a hop:
forward, the link's peer computes the hop's layers statelessly (`forward`, with the adapter's pairs for those
layers) and the client keeps the hop's input; backward, a peer serving the same layers computes them again and
returns the gradient with respect to the input and to the adapter's pairs (`backward`). Since neither request
needs anything a peer kept, a hop whose peer is lost moves to any other peer (or several, split) serving its
layers, in the forward or in the backward, and the result is the same. Nodes never change their weights: the
trainable parameters (a soft prompt, an adapter) live on the client, and a torch optimizer steps them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from swarm.client.core.failover import LINK_FAILURES, MAX_FAILOVERS_PER_STEP, set_aside, worth_failing_over
from swarm.client.core.forward import ChainFailure, ask_link, forward_link
from swarm.client.core.links import checked_output, wire_hidden
from swarm.client.core.loop import EventLoopThread
from swarm.client.core.planner import ChainPlanner
from swarm.client.core.tuning import LowRankAdapter
from swarm.errors import ErrorCode, ProtocolError, SwarmError
from swarm.protocol import Backward, BackwardResult, WireTensor
from swarm.routing import Link

log = logging.getLogger("swarm.client")

AdapterGrads = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Hop:
    """Layers [start, end) of one differentiable pass, first tried on `link`'s peer."""

    planner: ChainPlanner
    link: Link
    positions: torch.Tensor
    mask: torch.Tensor
    adapter: LowRankAdapter | None

    @property
    def start(self) -> int:
        return self.link.start

    @property
    def end(self) -> int:
        return self.link.end

    async def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hop's output, from `link` or, when it fails, from peers that serve its layers."""
        chain = [self.link]
        for _ in range(MAX_FAILOVERS_PER_STEP):
            try:
                for link in chain:
                    hidden = await self._forward_link(link, hidden)
                return hidden
            except ChainFailure as failed:
                chain = await self._replan(failed)
        raise SwarmError(f"gave up on layers [{self.start}, {self.end}) after {MAX_FAILOVERS_PER_STEP} failed peers")

    async def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, AdapterGrads]:
        """Gradients of sum(hop(hidden) * grad_output) with respect to `hidden` and the adapter's pairs."""
        chain = [self.link]
        for _ in range(MAX_FAILOVERS_PER_STEP):
            try:
                return await self._backward_chain(chain, hidden, grad_output)
            except ChainFailure as failed:
                chain = await self._replan(failed)
        raise SwarmError(f"gave up on layers [{self.start}, {self.end}) after {MAX_FAILOVERS_PER_STEP} failed peers")

    async def _backward_chain(
        self, chain: list[Link], hidden: torch.Tensor, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, AdapterGrads]:
        """Through a chain that splits the hop (after a failover): the inputs of its links again, then their
        gradients from the last link back."""
        inputs = [hidden]
        for link in chain[:-1]:
            inputs.append(await self._forward_link(link, inputs[-1]))
        grads: AdapterGrads = {}
        for link, link_input in zip(reversed(chain), reversed(inputs), strict=True):
            grad_output, link_grads = await self._backward_link(link, link_input, grad_output)
            grads.update(link_grads)
        return grad_output, grads

    async def _replan(self, failed: ChainFailure) -> list[Link]:
        if not worth_failing_over(failed.error):
            raise failed.error
        set_aside(self.planner, failed.link.peer.peer_id, failed.error)
        log.info(
            "training hop [%d, %d) on %s failed (%s); moving it",
            self.start,
            self.end,
            failed.link.peer.address,
            failed.error,
        )
        return await self.planner.wait_for_chain(self.start, self.end, 0, await training_refusers(self.planner))

    async def _forward_link(self, link: Link, hidden: torch.Tensor) -> torch.Tensor:
        try:
            wire = self.adapter.wire(link.start, link.end) if self.adapter is not None else None
            return await forward_link(
                link,
                hidden,
                WireTensor.from_torch(self.positions),
                WireTensor.from_torch(self.mask),
                self.planner.credentials,
                adapter=wire,
            )
        except LINK_FAILURES as exc:
            raise ChainFailure(link, exc) from exc

    async def _backward_link(
        self, link: Link, hidden: torch.Tensor, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, AdapterGrads]:
        address = link.peer.address
        wire = self.adapter.wire(link.start, link.end) if self.adapter is not None else None
        message = Backward(
            start=link.start,
            end=link.end,
            hidden=wire_hidden(hidden, link.peer.dtype),
            position_ids=WireTensor.from_torch(self.positions),
            attention_mask=WireTensor.from_torch(self.mask),
            grad_output=wire_hidden(grad_output, link.peer.dtype),
            adapter=wire,
        )
        try:
            reply = await ask_link(link, self.planner.credentials, message, BackwardResult)
            grad_hidden = checked_output(reply.grad_hidden.to_torch(), hidden, address)
            grads = _adapter_grads(reply, wire, address)
        except LINK_FAILURES as exc:
            raise ChainFailure(link, exc) from exc
        return grad_hidden.to(hidden.dtype), grads


def _adapter_grads(reply: BackwardResult, sent: Any, address: str) -> AdapterGrads:
    """The reply's adapter gradients, one per pair sent, of the pair's shapes."""
    expected = [] if sent is None else sent.pairs
    if len(reply.adapter_grads) != len(expected):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{address} answered {len(reply.adapter_grads)} adapter gradients for {len(expected)} pairs",
        )
    grads: AdapterGrads = {}
    for pair, grad in zip(expected, reply.adapter_grads, strict=True):
        if (
            (grad.layer, grad.target) != (pair.layer, pair.target)
            or grad.a.shape != pair.a.shape
            or grad.b.shape != pair.b.shape
        ):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{address} answered adapter gradients that do not match the pairs sent"
            )
        grads[(pair.layer, pair.target)] = (grad.a.to_torch().float(), grad.b.to_torch().float())
    return grads


async def training_refusers(planner: ChainPlanner) -> frozenset[str]:
    """Peers that do not answer `backward` (started with `--no-training`): left out of training chains."""
    return frozenset(peer.peer_id for peer in await planner.usable_peers() if not peer.training)


class RemoteHop(torch.autograd.Function):
    """One hop as an autograd node: inputs are the hidden states and the adapter's tensors for the hop's layers
    (A, B per pair, in `LowRankAdapter.pairs_in` order), so their gradients reach the optimizer."""

    @staticmethod
    def forward(
        ctx: Any, hop: Hop, runner: EventLoopThread, hidden: torch.Tensor, *adapter: torch.Tensor
    ) -> torch.Tensor:
        ctx.hop, ctx.runner = hop, runner
        ctx.save_for_backward(hidden)
        return runner.run(hop.forward(hidden.detach()))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (hidden,) = ctx.saved_tensors
        hop: Hop = ctx.hop
        grad_hidden, grads = ctx.runner.run(hop.backward(hidden.detach(), grad_output.contiguous()))
        adapter_grads: list[torch.Tensor] = []
        if hop.adapter is not None:
            for layer, target, _, _ in hop.adapter.pairs_in(hop.start, hop.end):
                adapter_grads.extend(grads[(layer, target)])
        return (None, None, grad_hidden, *adapter_grads)


def remote_layers(
    planner: ChainPlanner,
    runner: EventLoopThread,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    adapter: LowRankAdapter | None,
) -> torch.Tensor:
    """`hidden` through every remote layer, differentiably (a chain of training peers, one `RemoteHop` a link)."""

    async def plan() -> list[Link]:
        return await planner.plan(avoid=await training_refusers(planner), forwarded=False)

    chain = runner.run(plan())
    positions, mask = positions.long().contiguous(), mask.bool().contiguous()
    for link in chain:
        hop = Hop(planner, link, positions, mask, adapter)
        tensors = [t for _, _, a, b in adapter.pairs_in(link.start, link.end) for t in (a, b)] if adapter else []
        hidden = RemoteHop.apply(hop, runner, hidden, *tensors)
    return hidden
