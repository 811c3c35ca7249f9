"""The registry's soft state: who serves what, until their heartbeats stop, and who may change each entry.
No I/O here.

A peer id belongs to the connection that announced it while that connection is open (its `owner`): announces
and leaves for it from anyone else are refused, so nobody can redirect or remove a live node's entry. When the
owner closes, the peer is marked gone and its id is free again, so a node whose link dropped re-announces on a
new connection; so does one whose heartbeats stopped (it expired), whatever became of its connection. Every
collection is bounded: peer ids per connection, peers in all, models served.

Nothing here grows with the swarm per message: expiry pops a heap (`_expiry`) instead of scanning every peer,
route queries read each checkpoint's per-layer index (`swarm.registry.index`), and the dashboard's view copies a
page of peers and per-layer counts, not the whole state."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from swarm.errors import ErrorCode, ProtocolError
from swarm.protocol import PeerInfo
from swarm.registry.index import LineUp, LineUpKey, line_up_key
from swarm.registry.settings import MAX_MODELS, MAX_PEERS, REPORTS_TO_EXCLUDE
from swarm.routing import describe_model

GONE_RETENTION_SECONDS = 120.0
"""How long a departed peer stays listed (as `gone`) so people can see what just happened."""
MAX_PEERS_PER_CONNECTION = 8
"""Peer ids one connection may announce: a node announces one."""
MAX_REPORTERS = 64
"""Distinct reporters remembered per peer: enough to pass any sensible threshold."""
MAX_LISTED_PEERS = 256
"""Peers the state page lists; the rest are only counted, so a page stays small whatever is announced."""

ModelKey = tuple[str, int]
KeyT = TypeVar("KeyT")


@dataclass(slots=True)
class PeerRecord:
    info: PeerInfo
    expires_at: float
    last_seen: float
    gone_at: float | None = None
    due: float = float("inf")
    """When this peer's entry in the expiry heap comes up: its expiry when that entry was pushed. A heartbeat only
    moves `expires_at`; the entry, once due, is pushed again for the new time."""


class PeerRow(NamedTuple):
    """One peer as the dashboard sees it: a copy taken on the event loop, safe to read elsewhere."""

    info: PeerInfo
    state: str
    last_seen: float


class StateView(NamedTuple):
    """What the dashboard and metrics show, copied on the event loop at a cost that does not grow with the swarm:
    a page of peers (live ones first), how many were left out, live peers by announced state and how many are
    gone, and each model's per-layer coverage."""

    rows: list[PeerRow]
    unlisted: int
    states: dict[str, int]
    models: list[dict[str, object]]


class RegistryState:
    def __init__(
        self,
        gone_retention: float = GONE_RETENTION_SECONDS,
        max_peers: int = MAX_PEERS,
        max_models: int = MAX_MODELS,
        max_per_owner: int = MAX_PEERS_PER_CONNECTION,
        reports_to_exclude: int = REPORTS_TO_EXCLUDE,
    ) -> None:
        self.gone_retention = gone_retention
        self.max_peers = max_peers
        self.max_models = max_models
        self.max_per_owner = max_per_owner
        self._peers: dict[str, PeerRecord] = {}
        self._owner_of: dict[str, Hashable] = {}
        self._owned: dict[Hashable, set[str]] = {}
        self._live_models: Counter[ModelKey] = Counter()
        self._live_states: Counter[str] = Counter()
        self._line_ups: dict[LineUpKey, LineUp] = {}
        self._at_address: dict[str, set[str]] = {}  # address -> ids of the live peers announcing it
        self._expiry: list[tuple[float, str]] = []  # (due, peer id) of live peers, and stale entries
        self._forgetting: list[tuple[float, str]] = []  # (gone at, peer id) of gone peers, and stale entries
        self.reports_to_exclude = reports_to_exclude
        self._reporters: dict[str, set[Hashable]] = {}

    def announce(self, info: PeerInfo, ttl: float, now: float, owner: Hashable | None = None) -> bool:
        """Record (or refresh) `info` for `owner`, a connection; None is this process itself, trusted. Returns
        whether `owner` announced this peer for the first time. Raises `ProtocolError` when the id belongs to
        another connection (`unauthorized`), when `owner` holds too many ids (`bad_request`), or when the registry
        is full (`busy`); the state is then unchanged."""
        self.expire(now)
        peer_id = info.peer_id
        holder = self._owner_of.get(peer_id)
        if holder is not None and holder != owner:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED, f"peer id {peer_id!r} belongs to another connection to this registry"
            )
        owned = self._owned.get(owner, set()) if owner is not None else set()
        if owner is not None and peer_id not in owned and len(owned) >= self.max_per_owner:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"a connection may announce at most {self.max_per_owner} peer ids"
            )
        self._check_room(info)
        record = self._peers.get(peer_id)
        if record is not None and record.gone_at is None:  # a heartbeat: the index moves only if the peer changed
            if record.info != info:  # else the old copy stays: the new one dies young, the collector never sees it
                self._unlist(record.info)
                self._list(info)
                record.info = info
            record.last_seen, record.expires_at = now, now + ttl
        else:
            record = self._peers[peer_id] = PeerRecord(info, now + ttl, now)
            self._list(info)
        if record.expires_at < record.due:
            self._schedule(peer_id, record)
        if owner is None or peer_id in owned:
            return False
        self._owner_of[peer_id] = owner
        self._owned.setdefault(owner, set()).add(peer_id)
        return True

    def leave(self, peer_id: str, now: float, owner: Hashable | None = None) -> bool:
        """`owner` says its peer left: mark it gone and free its id. A peer nobody holds is gone already (a
        node's own link closed first), so that is a no-op; another connection's peer is refused. Returns whether
        a peer left."""
        holder = self._owner_of.get(peer_id)
        if holder is not None and holder != owner:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED, f"peer id {peer_id!r} belongs to another connection to this registry"
            )
        if holder is not None:
            self._release(peer_id, holder)
        was_live = self._is_live(peer_id)
        self.mark_gone(peer_id, now)
        return was_live

    def disconnect(self, owner: Hashable, now: float) -> list[str]:
        """`owner`'s connection closed: its peers are most likely gone. Returns their ids."""
        peer_ids = sorted(self._owned.get(owner, ()))
        for peer_id in peer_ids:
            self._release(peer_id, owner)
            self.mark_gone(peer_id, now)
        return peer_ids

    def mark_gone(self, peer_id: str, now: float) -> None:
        record = self._peers.get(peer_id)
        if record is not None and record.gone_at is None:
            self._set_gone(peer_id, record, now)

    def expire(self, now: float) -> None:
        """Peers whose heartbeats stopped are gone (their ids free), and those gone for `gone_retention` are
        forgotten: both by popping heaps, so a call costs what it removes, not the size of the swarm."""
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            due, peer_id = heapq.heappop(expiry)
            record = self._peers.get(peer_id)
            if record is None or record.gone_at is not None or record.due != due:
                continue  # stale: the peer left, or an earlier expiry was pushed for it since
            if record.expires_at > now:
                self._schedule(peer_id, record)  # heartbeats came meanwhile
                continue
            self._set_gone(peer_id, record, record.expires_at)
            holder = self._owner_of.get(peer_id)
            if holder is not None:
                self._release(peer_id, holder)
        forgetting = self._forgetting
        while forgetting and now - forgetting[0][0] > self.gone_retention:
            self._forget(*heapq.heappop(forgetting))

    def report(self, peer_id: str, reporter: Hashable) -> bool:
        """A client (`reporter`: its address) caught `peer_id` answering wrongly. Only peers kept are counted, and
        each reporter once. Returns whether the peer is now left out of queries."""
        if peer_id not in self._peers:
            return False
        reporters = self._reporters.setdefault(peer_id, set())
        if len(reporters) < MAX_REPORTERS:
            reporters.add(reporter)
        return self.excluded(peer_id)

    def excluded(self, peer_id: str) -> bool:
        """Reported by enough independent clients: queries leave it out, the dashboard shows it `reported`."""
        return len(self._reporters.get(peer_id, ())) >= self.reports_to_exclude

    def live_peers(self, now: float, model: str | None = None, model_id: str | None = None) -> list[PeerInfo]:
        """Every live peer (of `model`; serving the checkpoint `model_id`), without those reported as lying: what
        `swarm-client status` and `--layers auto` ask for. Route queries take `route_candidates` instead."""
        self.expire(now)
        return [
            record.info
            for record in self._peers.values()
            if record.gone_at is None and self._answers(record.info, model, model_id)
        ]

    def live_at(self, now: float, address: str, model: str | None, model_id: str | None) -> list[PeerInfo]:
        """The live peers (of `model`; serving `model_id`) that announce `address`, without those reported as lying:
        what a node asks before it forwards a step there (`swarm.node.relay`), at a cost that does not grow with
        the swarm."""
        self.expire(now)
        infos = (self._peers[peer_id].info for peer_id in sorted(self._at_address.get(address, ())))
        return [info for info in infos if self._answers(info, model, model_id)]

    def _answers(self, info: PeerInfo, model: str | None, model_id: str | None) -> bool:
        """Whether a listing of `model` (and `model_id`) shows the live peer `info`: not when reported as lying."""
        return (
            (model is None or info.model == model)
            and (model_id is None or info.model_id == model_id)
            and not self.excluded(info.peer_id)
        )

    def live_page(
        self, now: float, model: str | None, model_id: str | None, after: str | None, limit: int
    ) -> tuple[list[PeerInfo], bool]:
        """One page of `live_peers` by `peer_id`: at most `limit` whose id sorts after `after`, and whether more
        follow. (Listings are rare, `swarm-client status` and `--layers auto`; sorting costs a few ms at 10,000.)"""
        listed = sorted(
            (info for info in self.live_peers(now, model, model_id) if after is None or info.peer_id > after),
            key=lambda info: info.peer_id,
        )
        return listed[:limit], len(listed) > limit

    def route_candidates(
        self,
        now: float,
        model: str | None,
        model_id: str | None,
        per_layer: int,
        cache_tokens: int = 0,
        exclude: Collection[str] = (),
    ) -> list[PeerInfo]:
        """What a client needs to plan a chain: for every layer of every matching checkpoint, the `per_layer`
        online peers a planner would try first (`LineUp.best`), without those in `exclude` or reported. The same
        announcements give the same answer, in the same order, on every registry."""
        self.expire(now)
        excluded = set(exclude)

        def skip(peer_id: str) -> bool:
            return peer_id in excluded or self.excluded(peer_id)

        chosen: list[tuple[LineUpKey, float, str]] = []
        for key in sorted(self._line_ups):
            if (model is None or key[0] == model) and (model_id is None or key[2] == model_id):
                best = self._line_ups[key].best(per_layer, cache_tokens, skip)
                chosen += sorted((key, rank, peer_id) for rank, peer_id in best.values())
        return [self._peers[peer_id].info for _, _, peer_id in chosen]

    def view(self, now: float, max_listed: int = MAX_LISTED_PEERS) -> StateView:
        """The dashboard's and metrics' copy of the state (see `StateView`); the rest of their work (`state_view`,
        `swarm.registry.metrics`) runs off the event loop."""
        self.expire(now)
        live: list[PeerRow] = []
        gone: list[PeerRow] = []
        for peer_id, record in self._peers.items():
            if len(live) >= max_listed:
                break
            if record.gone_at is None:
                live.append(PeerRow(record.info, self._shown_state(peer_id, record), record.last_seen))
            elif len(gone) < max_listed:
                gone.append(PeerRow(record.info, "gone", record.last_seen))
        rows = (live + gone)[:max_listed]
        states = dict(self._live_states)
        states["gone"] = len(self._peers) - sum(self._live_states.values())
        return StateView(rows, len(self._peers) - len(rows), states, self._coverage())

    def snapshot(self, now: float, max_listed: int = MAX_LISTED_PEERS) -> dict[str, object]:
        """Everything the dashboard and `GET /api/v1/state` show, as plain JSON-ready data."""
        return state_view(self.view(now, max_listed), now)

    def _coverage(self) -> list[dict[str, object]]:
        """Every model served now: online peers per layer (summed over its checkpoints) and live peers."""
        described = []
        for (name, num_layers), live in sorted(self._live_models.items()):
            counts = [0] * num_layers
            for key, line_up in self._line_ups.items():
                if key[:2] == (name, num_layers):
                    counts = [a + b for a, b in zip(counts, line_up.coverage, strict=True)]
            described.append(describe_model(name, counts, live))
        return described

    def _shown_state(self, peer_id: str, record: PeerRecord) -> str:
        return "reported" if self.excluded(peer_id) else record.info.state

    def _list(self, info: PeerInfo) -> None:
        """A live peer counts for its model and state, is found by its address; an online one enters its
        checkpoint's index."""
        self._at_address.setdefault(info.address, set()).add(info.peer_id)
        self._live_models[(info.model, info.num_layers)] += 1
        self._live_states[info.state] += 1
        if info.state == "online":
            key = line_up_key(info)
            line_up = self._line_ups.get(key)
            if line_up is None:
                line_up = self._line_ups[key] = LineUp(info.num_layers)
            line_up.add(info)

    def _unlist(self, info: PeerInfo) -> None:
        at_address = self._at_address[info.address]
        at_address.discard(info.peer_id)
        if not at_address:
            del self._at_address[info.address]
        _decrement(self._live_models, (info.model, info.num_layers))
        _decrement(self._live_states, info.state)
        if info.state == "online":
            key = line_up_key(info)
            line_up = self._line_ups[key]
            line_up.remove(info)
            if not line_up:
                del self._line_ups[key]

    def _schedule(self, peer_id: str, record: PeerRecord) -> None:
        record.due = record.expires_at
        heapq.heappush(self._expiry, (record.due, peer_id))

    def _set_gone(self, peer_id: str, record: PeerRecord, when: float) -> None:
        record.gone_at = when
        record.due = float("inf")
        self._unlist(record.info)
        heapq.heappush(self._forgetting, (when, peer_id))

    def _forget(self, gone_at: float, peer_id: str) -> bool:
        """Drop a peer gone since `gone_at`, unless that heap entry is stale (it came back, or went again later)."""
        record = self._peers.get(peer_id)
        if record is None or record.gone_at != gone_at:
            return False
        del self._peers[peer_id]
        self._reporters.pop(peer_id, None)
        return True

    def _check_room(self, info: PeerInfo) -> None:
        key = (info.model, info.num_layers)
        if key not in self._live_models and len(self._live_models) >= self.max_models:
            raise ProtocolError(ErrorCode.BUSY, f"this registry tracks at most {self.max_models} models at once")
        if info.peer_id in self._peers or len(self._peers) < self.max_peers:
            return
        while self._forgetting:  # the one gone longest makes room
            if self._forget(*heapq.heappop(self._forgetting)):
                return
        raise ProtocolError(ErrorCode.BUSY, f"this registry keeps at most {self.max_peers} peers")

    def _release(self, peer_id: str, owner: Hashable) -> None:
        del self._owner_of[peer_id]
        owned = self._owned[owner]
        owned.discard(peer_id)
        if not owned:
            del self._owned[owner]

    def _is_live(self, peer_id: str) -> bool:
        record = self._peers.get(peer_id)
        return record is not None and record.gone_at is None


def _decrement(counter: Counter[KeyT], key: KeyT) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def state_view(view: StateView, now: float) -> dict[str, object]:
    """The state page's data: every model's coverage, and the page of peers (sorted by model, span and id) with the
    count of those left out. Pure, so it may run off the event loop."""
    peers_view = []
    for row in sorted(view.rows, key=lambda row: (row.info.model, row.info.start, row.info.peer_id)):
        entry = row.info.model_dump()
        entry["state"] = row.state
        entry["last_heartbeat_age"] = round(now - row.last_seen, 3)
        peers_view.append(entry)
    return {"models": view.models, "peers": peers_view, "peers_unlisted": view.unlisted}
