"""A checkpoint's online peers by layer, kept in the planner's order as announcements come and go, so a route query
costs what it answers (a few peers per layer) whatever the size of the swarm. No I/O here."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable

from swarm.protocol import PeerInfo
from swarm.routing import span_rank

LineUpKey = tuple[str, int, str]
"""(model name, number of layers, model_id or ""): the peers that can chain together."""

LOOKAHEAD = 4
"""How far past a layer's first few peers `LineUp.best` looks for ones that reach further (times `per_layer`)."""

Entry = tuple[float, str]
"""(`span_rank`, peer id): a layer's peers sort by the planner's cost, then by id, the same on every registry."""


def line_up_key(info: PeerInfo) -> LineUpKey:
    return (info.model, info.num_layers, info.model_id or "")


class LineUp:
    """The online peers of one line-up. For each layer, those serving it, grouped by their free cache (one group per
    power of two) and sorted in each group by `span_rank`; and how many serve each layer (the dashboard's coverage).
    Adding or removing a peer costs its span's length times a bisection; a query never looks at the whole list."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[dict[int, list[Entry]]] = [{} for _ in range(num_layers)]
        self.coverage = [0] * num_layers
        self.free: dict[str, int] = {}
        self.end: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.free)

    def add(self, info: PeerInfo) -> None:
        entry, group = (span_rank(info), info.peer_id), info.cache_tokens_free.bit_length()
        for layer in range(info.start, info.end):
            insort(self.layers[layer].setdefault(group, []), entry)
            self.coverage[layer] += 1
        self.free[info.peer_id] = info.cache_tokens_free
        self.end[info.peer_id] = info.end

    def remove(self, info: PeerInfo) -> None:
        entry, group = (span_rank(info), info.peer_id), info.cache_tokens_free.bit_length()
        for layer in range(info.start, info.end):
            groups = self.layers[layer]
            entries = groups[group]
            del entries[bisect_left(entries, entry)]
            if not entries:
                del groups[group]
            self.coverage[layer] -= 1
        del self.free[info.peer_id]
        del self.end[info.peer_id]

    def best(self, per_layer: int, cache_tokens: int, skip: Callable[[str], bool]) -> dict[str, Entry]:
        """For every layer, the `per_layer` first peers in the planner's order among those with `cache_tokens` free
        (topped up with the first of those without, the planner's last resort), leaving out those `skip` names; and
        among the next `LOOKAHEAD` times as many, each that reaches further than every one before it (a longer span
        saves hops, which the order by cost per layer only estimates)."""
        chosen: dict[str, Entry] = {}
        for groups in self.layers:
            roomy: list[Entry] = []
            short: list[Entry] = []
            for group, entries in groups.items():
                none_fit = (1 << group) - 1 < cache_tokens  # the group's largest possible free cache
                seen_roomy = found_short = 0
                for entry in entries:
                    if skip(entry[1]):
                        continue
                    if self.free[entry[1]] >= cache_tokens:
                        roomy.append(entry)
                        seen_roomy += 1
                    elif found_short < per_layer:
                        short.append(entry)
                        found_short += 1
                    if seen_roomy >= per_layer * LOOKAHEAD or (none_fit and found_short >= per_layer):
                        break
            picked = self._reaching(sorted(roomy), per_layer)
            if len(picked) < per_layer:
                picked += sorted(short)[: per_layer - len(picked)]
            for entry in picked:
                chosen[entry[1]] = entry
        return chosen

    def _reaching(self, ordered: list[Entry], per_layer: int) -> list[Entry]:
        """The first `per_layer` of `ordered`, then those of the rest that end further than all before them."""
        picked = ordered[:per_layer]
        furthest = max((self.end[entry[1]] for entry in picked), default=0)
        for entry in ordered[per_layer:]:
            end = self.end[entry[1]]
            if end > furthest:
                picked.append(entry)
                furthest = end
        return picked
