"""Who a connection is, for the limits a node puts on each client, and how fast each client may send steps.

A client is a connection, and apart, every connection from one remote address together (`client_address`): per
connection alone, one client could open connections until it held the whole node. Connections from loopback
count per connection only: a local swarm's clients all come from 127.0.0.1 (a node behind a reverse proxy on its
own machine then limits each proxied connection, not each address behind the proxy).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable

ClientKey = Hashable
"""("connection", id) or ("address", text): one budget of the clients a frame counts against."""

_PRUNE_AT = 4096
"""Buckets kept before the idle ones (full again) are dropped."""


def client_address(remote: object) -> str | None:
    """The address a connection counts under: its IP address, or for IPv6 its /64 network (one host routinely
    holds a whole /64); None for loopback and for sockets without an address (each connection is then alone)."""
    if not isinstance(remote, tuple) or not remote:
        return None
    try:
        ip = ipaddress.ip_address(str(remote[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def client_keys(owner: int, address: str | None) -> list[ClientKey]:
    """Every client a frame of connection `owner` from `address` counts against."""
    return [("connection", owner)] + ([("address", address)] if address is not None else [])


class StepRate:
    """Steps per second per client, as token buckets that hold one second of steps (the burst a client may send
    after a pause); `per_second` 0 is no limit."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.burst = max(per_second, 1.0)
        self._buckets: dict[ClientKey, tuple[float, float]] = {}  # key -> (tokens, when counted)

    def allow(self, keys: Iterable[ClientKey], now: float) -> bool:
        """Whether a step of a connection that is every client in `keys` may run now; if so, it is counted."""
        if self.per_second <= 0:
            return True
        keys = list(keys)
        levels = [self._level(key, now) for key in keys]
        if any(level < 1.0 for level in levels):
            return False
        for key, level in zip(keys, levels, strict=True):
            self._buckets[key] = (level - 1.0, now)
        if len(self._buckets) > _PRUNE_AT:
            self._prune(now)
        return True

    def forget(self, key: ClientKey) -> None:
        """A client that went away (a closed connection)."""
        self._buckets.pop(key, None)

    def _level(self, key: ClientKey, now: float) -> float:
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.per_second)

    def _prune(self, now: float) -> None:
        full = [key for key in self._buckets if self._level(key, now) >= self.burst]
        for key in full:
            del self._buckets[key]
