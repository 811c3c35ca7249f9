"""What the OpenAI-compatible gateway (`swarm-client serve`) is told beyond the client's own settings:
its flags, then `SWARM_GATEWAY_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from swarm.settings import SwarmSettings


class GatewaySettings(SwarmSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_GATEWAY_")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, repr=False)
    max_concurrency: int = Field(8, ge=1)
