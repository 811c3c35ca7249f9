"""A client reaches only addresses its swarm could legitimately have: no loopback or LAN targets announced by a
stranger to a public swarm."""

from __future__ import annotations

import pytest

from swarm.client.core.addresses import AddressPolicy


@pytest.mark.parametrize(
    ("registry", "peer", "allowed"),
    [
        ("ws://127.0.0.1:7000", "ws://127.0.0.1:8001", True),  # a local swarm
        ("ws://127.0.0.1:7000", "ws://192.168.1.5:8001", True),
        ("ws://192.168.1.2:7000", "ws://10.0.0.7:8001", True),  # a LAN swarm
        ("ws://192.168.1.2:7000", "ws://127.0.0.1:6379", False),
        ("wss://registry.example.org:7000", "wss://1.1.1.1:8001", True),  # a public swarm
        ("wss://registry.example.org:7000", "wss://node.example.net:8001", True),
        ("ws://8.8.4.4:7000", "ws://127.0.0.1:6379", False),
        ("ws://8.8.4.4:7000", "ws://localhost:8001", False),
        ("ws://8.8.4.4:7000", "ws://10.1.2.3:8001", False),
        ("ws://8.8.4.4:7000", "ws://169.254.169.254:80", False),  # cloud metadata
        ("ws://8.8.4.4:7000", "ws://[::1]:8001", False),
        ("ws://127.0.0.1:7000", "http://127.0.0.1:8001", False),
        ("ws://127.0.0.1:7000", "ws://0.0.0.0:8001", False),
        ("ws://localhost:7000", "ws://127.0.0.1:8001", True),  # a registry's host name is resolved
    ],
)
def test_peer_addresses_a_client_may_connect_to(registry: str, peer: str, allowed: bool) -> None:
    assert AddressPolicy.for_registries([registry]).allows(peer) is allowed
