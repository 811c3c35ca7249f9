"""Prometheus view of the registry, computed from its state at scrape time."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from swarm.registry.state import RegistryState

PEER_STATES = ("joining", "online", "draining", "gone")


class RegistryCollector(Collector):
    def __init__(self, state: RegistryState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.state.snapshot(time.monotonic())
        peers = GaugeMetricFamily("swarm_registry_peers", "Peers known to the registry, by state", labels=["state"])
        counts = Counter(peer["state"] for peer in snapshot["peers"])  # type: ignore[union-attr]
        for state in PEER_STATES:
            peers.add_metric([state], counts.get(state, 0))
        yield peers
        layers = GaugeMetricFamily("swarm_model_layers", "Transformer layers of each served model", labels=["model"])
        covered = GaugeMetricFamily(
            "swarm_model_layers_covered", "Layers with at least one online peer", labels=["model"]
        )
        weakest = GaugeMetricFamily(
            "swarm_model_min_replicas", "Online peers on the least-served layer", labels=["model"]
        )
        usable = GaugeMetricFamily("swarm_model_usable", "1 when every layer is served", labels=["model"])
        for model in snapshot["models"]:  # type: ignore[union-attr]
            name, coverage = [model["name"]], model["coverage"]
            layers.add_metric(name, model["num_layers"])
            covered.add_metric(name, sum(1 for count in coverage if count))
            weakest.add_metric(name, min(coverage) if coverage else 0)
            usable.add_metric(name, 1 if model["usable"] else 0)
        yield from (layers, covered, weakest, usable)


def registry_metrics(state: RegistryState) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RegistryCollector(state))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
