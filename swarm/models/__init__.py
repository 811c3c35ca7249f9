"""Model adapters, one per family, chosen by the checkpoint's `model_type`."""

from __future__ import annotations

from transformers import PretrainedConfig

from swarm.errors import UnsupportedModelError
from swarm.models.base import ModelAdapter
from swarm.models.llama import LlamaAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter,)


def supported_model_types() -> list[str]:
    return sorted(model_type for adapter in ADAPTERS for model_type in adapter.model_types)


def adapter_for(config: PretrainedConfig) -> ModelAdapter:
    """The adapter for this checkpoint's family, or an error listing the supported ones."""
    for adapter in ADAPTERS:
        if config.model_type in adapter.model_types:
            return adapter(config)
    raise UnsupportedModelError(
        f"model_type {config.model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "supported_model_types"]
