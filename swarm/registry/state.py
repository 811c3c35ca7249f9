"""The registry's soft state: who serves what, until their heartbeats stop, and who may change each entry.
No I/O here.

A peer id belongs to the connection that announced it while that connection is open (its `owner`): announces
and leaves for it from anyone else are refused, so nobody can redirect or remove a live node's entry. When the
owner closes, the peer is marked gone and its id is free again, so a node whose link dropped re-announces on a
new connection. Every collection is bounded: peer ids per connection, peers in all, models served."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from swarm.errors import ErrorCode, ProtocolError
from swarm.protocol import PeerInfo
from swarm.registry.settings import MAX_MODELS, MAX_PEERS, REPORTS_TO_EXCLUDE
from swarm.routing import describe_models

GONE_RETENTION_SECONDS = 120.0
"""How long a departed peer stays listed (as `gone`) so people can see what just happened."""
MAX_PEERS_PER_CONNECTION = 8
"""Peer ids one connection may announce: a node announces one."""
MAX_REPORTERS = 64
"""Distinct reporters remembered per peer: enough to pass any sensible threshold."""
MAX_LISTED_PEERS = 256
"""Peers the state page lists; the rest are only counted, so a page stays small whatever is announced."""

ModelKey = tuple[str, int]


@dataclass
class PeerRecord:
    info: PeerInfo
    expires_at: float
    last_seen: float
    gone_at: float | None = None


class PeerRow(NamedTuple):
    """One peer as the dashboard and metrics see it: a copy taken on the event loop, safe to read elsewhere."""

    info: PeerInfo
    state: str
    last_seen: float


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
        self.reports_to_exclude = reports_to_exclude
        self._reporters: dict[str, set[Hashable]] = {}

    def announce(self, info: PeerInfo, ttl: float, now: float, owner: Hashable | None = None) -> bool:
        """Record (or refresh) `info` for `owner`, a connection; None is this process itself, trusted. Returns
        whether `owner` announced this peer for the first time. Raises `ProtocolError` when the id belongs to
        another connection (`unauthorized`), when `owner` holds too many ids (`bad_request`), or when the registry
        is full (`busy`); the state is then unchanged."""
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
        self._check_room(info, now)
        self.mark_gone(peer_id, now)  # takes the old entry's model off the live count
        self._peers[peer_id] = PeerRecord(info, now + ttl, now)
        self._live_models[_model_key(info)] += 1
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
            record.gone_at = now
            self._forget_model(record.info)

    def expire(self, now: float) -> None:
        for peer_id, record in list(self._peers.items()):
            if record.gone_at is None and record.expires_at <= now:
                record.gone_at = record.expires_at
                self._forget_model(record.info)
            if record.gone_at is not None and now - record.gone_at > self.gone_retention:
                del self._peers[peer_id]
                self._reporters.pop(peer_id, None)

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
        """Live peers (of `model`; serving the checkpoint `model_id`), without those reported as lying."""
        self.expire(now)
        return [
            record.info
            for peer_id, record in self._peers.items()
            if record.gone_at is None
            and (model is None or record.info.model == model)
            and (model_id is None or record.info.model_id == model_id)
            and not self.excluded(peer_id)
        ]

    def rows(self, now: float) -> list[PeerRow]:
        """Every peer kept, live or gone, as immutable rows: cheap enough for the event loop, and what the
        state page and metrics are built from elsewhere (`state_view`, a worker thread)."""
        self.expire(now)
        return [
            PeerRow(record.info, self._shown_state(peer_id, record), record.last_seen)
            for peer_id, record in self._peers.items()
        ]

    def _shown_state(self, peer_id: str, record: PeerRecord) -> str:
        if record.gone_at is not None:
            return "gone"
        return "reported" if self.excluded(peer_id) else record.info.state

    def snapshot(self, now: float, max_listed: int = MAX_LISTED_PEERS) -> dict[str, object]:
        """Everything the dashboard and `GET /api/v1/state` show, as plain JSON-ready data."""
        return state_view(self.rows(now), now, max_listed)

    def _check_room(self, info: PeerInfo, now: float) -> None:
        key = _model_key(info)
        if key not in self._live_models and len(self._live_models) >= self.max_models:
            self.expire(now)  # only when full: peers whose heartbeats stopped free their models
            if len(self._live_models) >= self.max_models:
                raise ProtocolError(ErrorCode.BUSY, f"this registry tracks at most {self.max_models} models at once")
        if info.peer_id in self._peers or len(self._peers) < self.max_peers:
            return
        self.expire(now)
        gone = [(record.gone_at, peer_id) for peer_id, record in self._peers.items() if record.gone_at is not None]
        if len(self._peers) >= self.max_peers and not gone:
            raise ProtocolError(ErrorCode.BUSY, f"this registry keeps at most {self.max_peers} peers")
        if len(self._peers) >= self.max_peers:
            oldest = min(gone)[1]  # the one gone longest makes room
            del self._peers[oldest]
            self._reporters.pop(oldest, None)

    def _release(self, peer_id: str, owner: Hashable) -> None:
        del self._owner_of[peer_id]
        owned = self._owned[owner]
        owned.discard(peer_id)
        if not owned:
            del self._owned[owner]

    def _is_live(self, peer_id: str) -> bool:
        record = self._peers.get(peer_id)
        return record is not None and record.gone_at is None

    def _forget_model(self, info: PeerInfo) -> None:
        key = _model_key(info)
        self._live_models[key] -= 1
        if self._live_models[key] <= 0:
            del self._live_models[key]


def _model_key(info: PeerInfo) -> ModelKey:
    return (info.model, info.num_layers)


def state_view(rows: Sequence[PeerRow], now: float, max_listed: int = MAX_LISTED_PEERS) -> dict[str, object]:
    """The state page's data: every model's coverage, and at most `max_listed` peers (live ones first), with the
    count of those left out. Pure, so it may run off the event loop."""
    live = [row.info for row in rows if row.state != "gone"]
    listed = sorted(rows, key=lambda row: row.state == "gone")[:max_listed]
    peers_view = []
    for row in sorted(listed, key=lambda row: (row.info.model, row.info.start, row.info.peer_id)):
        entry = row.info.model_dump()
        entry["state"] = row.state
        entry["last_heartbeat_age"] = round(now - row.last_seen, 3)
        peers_view.append(entry)
    return {"models": describe_models(live), "peers": peers_view, "peers_unlisted": len(rows) - len(listed)}
