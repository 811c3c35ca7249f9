"""Everything a node is told: `swarm-node` flags, then `SWARM_NODE_*` (and the shared `SWARM_*`) variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from swarm.dtypes import FloatDType
from swarm.settings import DEFAULT_REGISTRY, Registries, SwarmSettings, shared


class NodeSettings(SwarmSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_NODE_")

    model: str | None = shared("SWARM_MODEL", description="checkpoint folder; default: the embedded demo model")
    model_name: str | None = None
    layers: str = Field("auto", description="inclusive range such as 0-9, or auto")
    max_memory: str | None = Field(None, description="budget for weights + KV cache, e.g. 6GiB")
    registry: Registries = shared("SWARM_REGISTRY", [DEFAULT_REGISTRY])
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    public_address: str | None = None
    device: str = "cpu"
    dtype: FloatDType | None = None
    max_sessions: int = Field(64, ge=1)
    cache_tokens: int = Field(65536, ge=1)
    max_batch_size: int = Field(64, ge=1)
    max_length: int = Field(8192, ge=1, description="longest sequence a session or forward may hold")
    quantize: str | None = Field(None, description="int8: weight-only int8 linear layers (CPU)")
    batch_steps: bool = Field(True, description="run concurrent sessions' decode steps as one forward")
    compile: bool = Field(False, description="torch.compile the layers (GPU: fuses a decode step's small ops)")
    prefill_chunk: int = Field(256, ge=0, description="tokens of a long step computed at a time; 0: never split")
    max_forward_tokens: int = Field(8192, ge=1, description="tokens (batch x length) one stateless forward may carry")
    training: bool = Field(True, description="answer backward requests (clients training through the swarm)")
    max_training_tokens: int = Field(4096, ge=1, description="tokens (batch x length) one backward may carry")
    max_adapter_bytes: int = Field(16 * 2**20, ge=0, description="bytes of one session's or pass's adapter")
    max_sessions_per_client: int | None = Field(
        None,
        ge=1,
        description="sessions one client (a connection; or an IP address) may hold; default: half of --max-sessions",
    )
    max_cache_share_per_client: float = Field(
        0.5, gt=0, le=1, description="share of --cache-tokens one client may reserve (its first session may exceed it)"
    )
    max_steps_per_second_per_client: float = Field(0.0, ge=0, description="step and forward frames; 0: no limit")
    max_message_bytes: int = Field(64 * 2**20, ge=1024)
    hello_timeout: float = Field(5.0, gt=0, description="a connection that has not said hello by then is closed")
    first_step_timeout: float = Field(30.0, gt=0, description="a session that has not stepped by then is freed")
    session_idle_timeout: float = Field(300.0, gt=0)
    max_session_seconds: float = Field(24 * 3600.0, gt=0, description="a session is ended after this long")
    drain_timeout: float = Field(15.0, ge=0, description="on SIGTERM, how long to wait for clients to move")
    announce_interval: float = Field(5.0, gt=0)
    probe_interval: float = Field(
        30.0, gt=0, description="how often to list the peers that may follow this node and measure new ones"
    )
    token: str | None = shared("SWARM_TOKEN", repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = shared("SWARM_TLS_CA")
    torch_threads: int | None = Field(None, ge=1)
    progress: bool = True
    log_level: str = shared("SWARM_LOG_LEVEL", "INFO")
