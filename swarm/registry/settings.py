"""Everything a registry is told: `swarm-registry` flags, then `SWARM_REGISTRY_*` (and shared `SWARM_*`) variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from swarm.settings import SwarmSettings, shared

MAX_PEERS = 16384
"""Peers a registry keeps, live or gone (gone ones make room for new ones first): a swarm of 10,000 nodes and its
recent departures (bench/registry.py measures a registry at that size)."""
MAX_MODELS = 64
"""Models (name and number of layers) the live peers may serve at once."""
REPORTS_TO_EXCLUDE = 3
"""Independent clients (distinct addresses) that must report a peer before queries leave it out."""
WARMUP_SECONDS = 10.0
"""After a (re)start, how long a registry's answers say `warming`: two default heartbeat periods, enough for every
node to reconnect and announce again (bench/registry.py --restart measures it)."""


class RegistrySettings(SwarmSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_REGISTRY_")

    host: str = "127.0.0.1"
    port: int = Field(7000, ge=0, le=65535)
    token: str | None = shared("SWARM_TOKEN", repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = shared("SWARM_LOG_LEVEL", "INFO")
    max_peers: int = Field(MAX_PEERS, ge=1, le=1_000_000)
    max_models: int = Field(MAX_MODELS, ge=1, le=10_000)
    reports_to_exclude: int = Field(REPORTS_TO_EXCLUDE, ge=1, le=1000)
    warmup: float = Field(WARMUP_SECONDS, ge=0, le=3600)
