"""Node-to-node forwarding: one step through a whole chain with the client at its ends only.

Client-in-the-middle, a token waits a round trip per link: client -> node 1 -> client -> node 2 -> ... Forwarded,
the client sends the step to the first node with the rest of the chain (`Step.relay`); each node sends its
output straight on to the next one, and every node also answers its own output to the client (on the client's
channel to it, by a `step_id` the client registered beforehand). The last answer is the chain's output: about
one one-way trip per link plus one back. The other answers arrive while later links compute, off the critical
path, and are recorded as each link's history exactly as a client-in-the-middle step records them, so failover
replays the same inputs.

Whenever the forwarded step cannot go all the way (a node fails, cannot reach the next one, or its answer is
caught lying by span verification), the client takes over from that link, client-in-the-middle, failing over as
usual. Later links may have computed a step the client did not accept: their next step first rolls them back
to what the client recorded (`LinkSession.keep`), so nothing they computed unasked stays in their caches.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from swarm.client.core.failover import LINK_FAILURES
from swarm.client.core.links import LinkInputs

if TYPE_CHECKING:
    from swarm.client.core.sessions import ChainSession


async def forwarded_step(session: ChainSession, inputs: LinkInputs) -> torch.Tensor:
    links = session.links
    ids = [link.channel.next_step_id() for link in links]
    waiting = [link.channel.expect(step_id) for link, step_id in zip(links, ids, strict=True)]
    arrived: dict[int, float] = {}
    for index, reply in enumerate(waiting):
        reply.add_done_callback(lambda _, index=index: arrived.setdefault(index, time.monotonic()))
    relay = [link.relay_hop(step_id) for link, step_id in zip(links[1:], ids[1:], strict=True)]
    message = links[0].step_message(inputs, ids[0], relay)
    sent = time.monotonic()
    try:
        await links[0].channel.send(message)
    except LINK_FAILURES as failure:
        _give_up(session, ids, 0)
        return await session.step_from(0, inputs, failure)
    for index, link in enumerate(links):
        try:
            reply = await link.channel.wait(ids[index], waiting[index])
            output = link.accept(reply, inputs)
        except LINK_FAILURES as failure:
            _give_up(session, ids, index + 1)
            return await session.step_from(index, inputs, failure)
        observe_link_compute(session, index, inputs, sent, arrived)
        checked = await session.verified(index, output)
        inputs = inputs.following(checked)
        if reply.relay_error is not None or checked is not output:
            _give_up(session, ids, index + 1)
            return await session.step_from(index + 1, inputs)
    return inputs.hidden


def observe_link_compute(
    session: ChainSession, index: int, inputs: LinkInputs, sent: float, arrived: dict[int, float]
) -> None:
    """Link `index`'s compute from when its answer and the one before it arrived. The first link's answer came a
    round trip plus its compute after the step left; a later link's came after the previous one's by its compute,
    the trip from the previous node (which that node measured and announced) and the difference of the two
    nodes' trips back to the client (half their measured round trips). A junction nobody measured is not
    guessed: that link is not observed."""
    if index not in arrived or (index > 0 and index - 1 not in arrived):
        return
    if index == 0:
        session.observe_compute(0, inputs, arrived[0] - sent)
        return
    previous, peer = session.links[index - 1].link.peer, session.links[index].link.peer
    junction_ms = previous.latencies_ms.get(peer.peer_id)
    round_trips = session.planner.round_trips
    if junction_ms is None or peer.peer_id not in round_trips or previous.peer_id not in round_trips:
        return
    back = (round_trips[peer.peer_id] - round_trips[previous.peer_id]) / 2
    session.observe_compute(index, inputs, arrived[index] - arrived[index - 1], trips=junction_ms / 2000 + back)


def _give_up(session: ChainSession, ids: list[int], first: int) -> None:
    """Stop waiting for links `first` on; what they may still compute is rolled back with their next step."""
    for link, step_id in zip(session.links[first:], ids[first:], strict=True):
        link.channel.abandon(step_id)
        link.keep = link.length
