"""Everything a client is told: `swarm-client` flags (or the Python API's arguments), then `SWARM_CLIENT_*`
and the shared `SWARM_*` variables. The gateway's own settings are `swarm.client.serve.settings`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from swarm.settings import DEFAULT_REGISTRY, Registries, SwarmSettings, shared

if TYPE_CHECKING:
    from swarm.transport import Credentials


class ClientSettings(SwarmSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_CLIENT_")

    registry: Registries = shared("SWARM_REGISTRY", [DEFAULT_REGISTRY])
    token: str | None = shared("SWARM_TOKEN", repr=False)
    tls_ca: str | None = shared("SWARM_TLS_CA")
    model: str | None = shared("SWARM_MODEL")
    models_dir: str | None = shared("SWARM_MODELS_DIR")
    model_name: str | None = None
    compression: str = "none"
    verify_rate: float = Field(0.03, ge=0, le=1)
    forwarding: bool = Field(True, description="steps go node to node along the chain (off: through the client)")
    soft_prompt: str | None = Field(None, description="tuning file whose soft prompt every request runs with")
    adapter: str | None = Field(None, description="tuning file whose low-rank adapter every request runs with")
    log_level: str = shared("SWARM_LOG_LEVEL", "WARNING")

    def credentials(self) -> Credentials:
        from swarm.transport import Credentials

        return Credentials(self.token, self.tls_ca)
