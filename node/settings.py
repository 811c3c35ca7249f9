"""Everything a node is told, from flags and `SWARM_*` environment variables."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from swarm.settings import parse_registries


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_", extra="forbid")

    model: str | None = Field(None, description="checkpoint folder; default: the embedded demo model")
    model_name: str | None = None
    layers: str = Field("auto", description="inclusive range such as 0-9, or auto")
    max_memory: str | None = Field(None, description="budget for weights + KV cache, e.g. 6GiB")
    registry: Annotated[list[str], NoDecode] = Field(default_factory=lambda: parse_registries(None))
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    public_address: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    max_sessions: int = Field(64, ge=1)
    cache_tokens: int = Field(65536, ge=1)
    max_batch_size: int = Field(64, ge=1)
    max_length: int = Field(8192, ge=1, description="longest sequence a session or forward may hold")
    quantize: str | None = Field(None, description="int8: weight-only int8 linear layers (CPU)")
    batch_steps: bool = Field(True, description="run concurrent sessions' decode steps as one forward")
    compile: bool = Field(False, description="torch.compile the layers (GPU: fuses a decode step's small ops)")
    prefill_chunk: int = Field(256, ge=0, description="tokens of a long step computed at a time; 0: never split")
    max_message_bytes: int = Field(64 * 2**20, ge=1024)
    session_idle_timeout: float = Field(300.0, gt=0)
    max_session_seconds: float = Field(24 * 3600.0, gt=0, description="a session is ended after this long")
    drain_timeout: float = Field(15.0, ge=0, description="on SIGTERM, how long to wait for clients to move")
    announce_interval: float = Field(5.0, gt=0)
    token: str | None = Field(None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    torch_threads: int | None = Field(None, ge=1)
    progress: bool = True

    @field_validator("registry", mode="before")
    @classmethod
    def _split_registries(cls, value: object) -> list[str]:
        return parse_registries(value)  # type: ignore[arg-type]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in ("float32", "bfloat16", "float16"):
            raise ValueError("dtype must be float32, bfloat16 or float16")
        return value
