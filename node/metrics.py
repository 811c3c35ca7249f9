"""Prometheus metrics of one node, in a registry of its own (no process-global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from swarm.node.sessions import SessionTable

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class NodeMetrics:
    def __init__(self, sessions: SessionTable, state: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.steps = Counter(
            "swarm_node_steps", "Requests computed, by kind (step or forward)", ["kind"], registry=self.registry
        )
        self.step_seconds = Histogram(
            "swarm_node_step_seconds",
            "Compute time of one step or forward",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.batched_steps = Counter(
            "swarm_node_batched_steps", "Steps computed inside a batch of several sessions", registry=self.registry
        )
        self.errors = Counter("swarm_node_errors", "Error frames sent, by code", ["code"], registry=self.registry)
        self.rolled_back = Counter(
            "swarm_node_rolled_back_tokens",
            "Cached tokens forgotten when a step rolled its session back (speculative drafts the client rejected)",
            registry=self.registry,
        )
        self.relays = Counter(
            "swarm_node_relays",
            "Step outputs forwarded to the next node of a client's chain, by outcome (sent or failed)",
            ["outcome"],
            registry=self.registry,
        )
        Gauge("swarm_node_sessions", "Open sessions", registry=self.registry).set_function(lambda: len(sessions))
        used = Gauge("swarm_node_cache_tokens_used", "KV cache tokens reserved by sessions", registry=self.registry)
        used.set_function(lambda: sessions.tokens_reserved)
        free = Gauge("swarm_node_cache_tokens_free", "KV cache tokens still available", registry=self.registry)
        free.set_function(lambda: sessions.tokens_free)
        online = Gauge("swarm_node_online", "1 while the node takes work", registry=self.registry)
        online.set_function(lambda: 1.0 if state() == "online" else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
