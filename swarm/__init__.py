"""swarm: peer-to-peer collaborative inference for large language models (shared core)."""

__version__ = "0.1.0"
