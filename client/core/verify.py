"""Span verification: catch a peer whose hidden states are wrong, and keep the output exact anyway.

Peers are strangers: one may perturb what it returns (a faulty GPU, a cheaper model, malice), and nothing in its
reply says so. The client therefore has a sampled fraction of link steps (`ChainPlanner.verify_rate`), and
always a peer's first step for this client, computed again by a second chain of other peers serving the same
layers: a stateless `forward` of the link's whole history (every step it was sent, this one last), whose last
positions must match the link's answer within a tolerance set by the dtypes and the number of layers. On a
mismatch a third chain breaks the tie: the side it contradicts lied. A lying link's peer is banned for this
client and reported to the registries, its layers fail over to other peers (history replayed, as after a
crash) and the step goes on with the honest output, so the generated text is what honest peers give. A lying
witness is banned and reported the same way, and the link's answer stands.

Sessions whose history reorders rows (beam search's `hypo_ids`) are not checked: their history is not one
sequence per row.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from swarm.client.core.forward import ChainFailure, forward_chain
from swarm.client.core.links import LinkSession
from swarm.client.core.planner import ChainPlanner
from swarm.errors import MissingLayersError, RegistryUnavailableError, SwarmFullError
from swarm.routing import Link

log = logging.getLogger("swarm.client")

DEFAULT_VERIFY_RATE = 0.03
WITNESS_VIEW_AGE = 10.0
"""Witnesses are picked from a view of the swarm up to this old: a check costs the witnesses' work, not also a
registry query."""

_RELATIVE_ERROR_PER_LAYER = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.5e-2}
MAX_TOLERANCE = 0.05
"""Relative error beyond which two answers disagree whatever the dtypes: a perturbation of a few percent of the
hidden states already changes the text."""


def tolerance(dtypes: set[str], layers: int) -> float:
    """How far two honest answers over `layers` layers, computed in `dtypes`, may be apart (relative RMS per
    token): rounding grows about with the square root of the depth."""
    per_layer = max(_RELATIVE_ERROR_PER_LAYER.get(dtype, MAX_TOLERANCE) for dtype in dtypes)
    return min(MAX_TOLERANCE, per_layer * math.sqrt(max(layers, 1)))


def relative_error(answer: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest, over tokens, of |answer - reference| / |reference| (L2 over the hidden size); inf when either
    holds a non-finite value."""
    answer, reference = answer.float(), reference.float()
    if not (bool(torch.isfinite(answer).all()) and bool(torch.isfinite(reference).all())):
        return math.inf
    scale = reference.norm(dim=-1).clamp_min(1e-6)
    return float(((answer - reference).norm(dim=-1) / scale).max()) if answer.numel() else 0.0


@dataclass(frozen=True)
class Verdict:
    """What checking a link's step found: `output` is the answer to go on with; `liar` is set when the link's own
    peer was caught (its layers must fail over)."""

    output: torch.Tensor
    liar: bool = False


class Verifier:
    """Decides which link steps to check and checks them (see the module's docstring)."""

    def __init__(self, planner: ChainPlanner, rng: random.Random | None = None) -> None:
        self.planner = planner
        self.rng = rng or random.Random()  # never torch's generator: a user's seeded sampling must not move
        self.checks = 0
        self.caught = 0

    def wants(self, link: LinkSession) -> bool:
        rate = self.planner.verify_rate
        if rate <= 0 or link.reordered:
            return False
        return link.link.peer.peer_id not in self.planner.proven or self.rng.random() < rate

    async def check(self, link: LinkSession, output: torch.Tensor) -> Verdict:
        """`output` is link's answer to its latest step (the last entry of its history)."""
        peer = link.link.peer
        self.checks += 1
        history = link.history
        whole = (
            torch.cat([past.hidden for past in history], dim=1),
            torch.cat([past.position_ids for past in history], dim=1),
            torch.cat([past.attention_mask for past in history], dim=1),
        )
        second = await self._recompute(link, whole, frozenset({peer.peer_id}))
        if second is None:
            log.debug("no other peer serves [%d, %d) to check %s against", link.link.start, link.link.end, peer.address)
            self.planner.proven.add(peer.peer_id)
            return Verdict(output)
        witnesses, recomputed = second
        limit = tolerance({peer.dtype, *(w.peer.dtype for w in witnesses)}, link.link.end - link.link.start)
        tokens = output.shape[1]
        recomputed = recomputed[:, -tokens:]
        error = relative_error(output, recomputed)
        if error <= limit:
            self.planner.proven.add(peer.peer_id)
            return Verdict(output)
        log.info(
            "layers [%d, %d): %s and %s disagree (relative error %.3g > %.3g); asking a third peer",
            link.link.start,
            link.link.end,
            peer.address,
            ", ".join(w.peer.address for w in witnesses),
            error,
            limit,
        )
        third = await self._recompute(link, whole, frozenset({peer.peer_id, *(w.peer.peer_id for w in witnesses)}))
        if third is None:
            log.warning(
                "cannot tell whether %s or %s answered layers [%d, %d) wrongly: no third peer serves them",
                peer.address,
                ", ".join(w.peer.address for w in witnesses),
                link.link.start,
                link.link.end,
            )
            return Verdict(output)
        referees, tie_breaker = third
        tie_breaker = tie_breaker[:, -tokens:]
        limit = max(limit, tolerance({r.peer.dtype for r in referees}, link.link.end - link.link.start))
        if relative_error(recomputed, tie_breaker) <= limit:
            self.caught += 1
            self.planner.ban_liar(peer, f"layers [{link.link.start}, {link.link.end}) off by {error:.3g}")
            return Verdict(recomputed.to(output.dtype), liar=True)
        if relative_error(output, tie_breaker) <= limit:
            self.caught += 1
            for witness in witnesses:
                self.planner.ban_liar(witness.peer, f"layers [{witness.start}, {witness.end}) contradicted twice")
            self.planner.proven.add(peer.peer_id)
            return Verdict(output)
        log.warning(
            "three answers for layers [%d, %d) all disagree (%s); keeping %s's",
            link.link.start,
            link.link.end,
            ", ".join(p.address for p in (peer, *(w.peer for w in witnesses), *(r.peer for r in referees))),
            peer.address,
        )
        return Verdict(output)

    async def _recompute(
        self,
        link: LinkSession,
        whole: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        avoid: frozenset[str],
    ) -> tuple[list[Link], torch.Tensor] | None:
        """The link's whole history (`whole`: hidden states, positions, mask, every step it was sent) through a
        chain of peers not in `avoid`, or None when there is none."""
        hidden, positions, mask = whole
        for _ in range(3):  # a witness that fails is set aside like any failed peer; try another
            try:
                chain = await self.planner.plan(link.link.start, link.link.end, avoid=avoid, max_age=WITNESS_VIEW_AGE)
            except (MissingLayersError, RegistryUnavailableError, SwarmFullError):
                return None
            try:
                return chain, await forward_chain(self.planner, chain, hidden, positions, mask, link.adapter)
            except ChainFailure as failure:
                log.info("witness %s failed: %s", failure.link.peer.address, failure.error)
                self.planner.ban(failure.link.peer.peer_id)
                avoid = avoid | {failure.link.peer.peer_id}
        return None
