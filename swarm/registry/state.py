"""The registry's soft state: who serves what, until their heartbeats stop. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.protocol import PeerInfo
from swarm.routing import describe_models

GONE_RETENTION_SECONDS = 120.0
"""How long a departed peer stays listed (as `gone`) so people can see what just happened."""


@dataclass
class PeerRecord:
    info: PeerInfo
    expires_at: float
    last_seen: float
    gone_at: float | None = None


class RegistryState:
    def __init__(self, gone_retention: float = GONE_RETENTION_SECONDS) -> None:
        self.gone_retention = gone_retention
        self._peers: dict[str, PeerRecord] = {}

    def announce(self, info: PeerInfo, ttl: float, now: float) -> None:
        self._peers[info.peer_id] = PeerRecord(info, now + ttl, now)

    def mark_gone(self, peer_id: str, now: float) -> None:
        record = self._peers.get(peer_id)
        if record is not None and record.gone_at is None:
            record.gone_at = now

    def expire(self, now: float) -> None:
        for peer_id, record in list(self._peers.items()):
            if record.gone_at is None and record.expires_at <= now:
                record.gone_at = record.expires_at
            if record.gone_at is not None and now - record.gone_at > self.gone_retention:
                del self._peers[peer_id]

    def live_peers(self, now: float, model: str | None = None) -> list[PeerInfo]:
        self.expire(now)
        return [
            record.info
            for record in self._peers.values()
            if record.gone_at is None and (model is None or record.info.model == model)
        ]

    def snapshot(self, now: float) -> dict[str, object]:
        """Everything the dashboard and `GET /api/v1/state` show, as plain JSON-ready data."""
        self.expire(now)
        live = [record.info for record in self._peers.values() if record.gone_at is None]
        peers_view = []
        for record in sorted(self._peers.values(), key=lambda r: (r.info.model, r.info.start, r.info.peer_id)):
            entry = record.info.model_dump()
            entry["state"] = "gone" if record.gone_at is not None else record.info.state
            entry["last_heartbeat_age"] = round(now - record.last_seen, 3)
            peers_view.append(entry)
        return {"models": describe_models(live), "peers": peers_view}
