"""`LocalSwarm`, the whole swarm on this machine that the demo, tests and benchmarks start."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.client.local_swarm import LocalSwarm, free_port


def test_a_swarm_never_hands_out_one_port_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Children bind their ports only once loaded: a port picked for one still looks free to the next pick."""
    swarm = LocalSwarm(tmp_path)
    picks = iter([swarm.registry_port, 20001, 20001, 20002, 20001, 20003])
    monkeypatch.setattr("swarm.client.local_swarm.free_port", lambda: next(picks))
    assert [swarm.new_port() for _ in range(3)] == [20001, 20002, 20003]


def test_free_ports_lie_outside_the_range_outgoing_connections_use() -> None:
    low, high = (int(bound) for bound in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert all(not low <= free_port() <= high for _ in range(50))
