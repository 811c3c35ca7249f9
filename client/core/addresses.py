"""Which peer addresses a client may connect to, so an announce cannot point it at its own network.

Peers announce their own addresses, and a client connects to whatever the registry lists: a stranger could
announce `ws://127.0.0.1:6379` or an address inside the client's LAN and have clients (a gateway on a server)
send requests there. A client therefore reaches loopback peers only when its registry is on loopback (a local
swarm), and private-network peers only when its registry is on a loopback or private address (a swarm on a
LAN); a swarm reached over the internet is asked for public addresses only. A registry's host name is resolved
once to tell which; a peer's host name is allowed (resolving it here would not stop a name that resolves
differently later).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


def address_kind(address: str) -> str:
    """`loopback`, `private`, `public`, `name` (a host name) or `invalid` for a ws:// or wss:// URL."""
    try:
        parts = urlsplit(address)
        host = parts.hostname
    except ValueError:
        return "invalid"
    if parts.scheme not in ("ws", "wss") or not host:
        return "invalid"
    if host == "localhost":
        return "loopback"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "name"
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "invalid"
    if ip.is_private or ip.is_link_local:
        return "private"
    return "public"


def _registry_kind(url: str) -> str:
    """A registry's kind, its host name resolved: `loopback` or `private` if any address it has is."""
    kind = address_kind(url)
    if kind != "name":
        return kind
    host, port = urlsplit(url).hostname, urlsplit(url).port or 0
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        return "public"
    kinds = {address_kind(f"ws://[{ip}]" if ":" in ip else f"ws://{ip}") for ip in resolved}
    return "loopback" if "loopback" in kinds else "private" if "private" in kinds else "public"


@dataclass(frozen=True)
class AddressPolicy:
    allowed: frozenset[str]

    @classmethod
    def for_registries(cls, registries: list[str]) -> AddressPolicy:
        kinds = {_registry_kind(url) for url in registries}
        allowed = {"public", "name"}
        if kinds & {"loopback", "private"}:
            allowed.add("private")
        if "loopback" in kinds:
            allowed.add("loopback")
        return cls(frozenset(allowed))

    def allows(self, address: str) -> bool:
        return address_kind(address) in self.allowed
