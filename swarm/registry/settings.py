"""Everything a registry is told: `swarm-registry` flags, then `SWARM_REGISTRY_*` (and shared `SWARM_*`) variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from swarm.settings import SwarmSettings, shared


class RegistrySettings(SwarmSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_REGISTRY_")

    host: str = "127.0.0.1"
    port: int = Field(7000, ge=0, le=65535)
    token: str | None = shared("SWARM_TOKEN", repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = shared("SWARM_LOG_LEVEL", "INFO")
