"""Prometheus view of the registry, rendered from a copy of its state (`StateView`), so it can run off the event
loop."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from swarm.registry.state import StateView

PEER_STATES = ("joining", "online", "draining", "gone")


class RegistryCollector(Collector):
    def __init__(self, view: StateView) -> None:
        self.view = view

    def collect(self) -> Iterator[GaugeMetricFamily]:
        peers = GaugeMetricFamily("swarm_registry_peers", "Peers known to the registry, by state", labels=["state"])
        for state in PEER_STATES:
            peers.add_metric([state], self.view.states.get(state, 0))
        yield peers
        layers = GaugeMetricFamily("swarm_model_layers", "Transformer layers of each served model", labels=["model"])
        covered = GaugeMetricFamily(
            "swarm_model_layers_covered", "Layers with at least one online peer", labels=["model"]
        )
        weakest = GaugeMetricFamily(
            "swarm_model_min_replicas", "Online peers on the least-served layer", labels=["model"]
        )
        usable = GaugeMetricFamily("swarm_model_usable", "1 when every layer is served", labels=["model"])
        for model in self.view.models:
            name, coverage = [model["name"]], model["coverage"]
            layers.add_metric(name, model["num_layers"])
            covered.add_metric(name, sum(1 for count in coverage if count))
            weakest.add_metric(name, min(coverage) if coverage else 0)
            usable.add_metric(name, 1 if model["usable"] else 0)
        yield from (layers, covered, weakest, usable)


def render(view: StateView) -> bytes:
    """The registry's metrics in Prometheus' text format; a registry of collectors of its own per call, so
    nothing is shared with the thread that renders the previous scrape."""
    registry = CollectorRegistry()
    registry.register(RegistryCollector(view))
    return generate_latest(registry)
