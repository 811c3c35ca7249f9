"""Model adapters, one per family, chosen by the checkpoint's `model_type`."""

from __future__ import annotations

from transformers import PretrainedConfig

from swarm.errors import UnsupportedModelError
from swarm.models.base import ModelAdapter
from swarm.models.bloom import BloomAdapter
from swarm.models.falcon import FalconAdapter
from swarm.models.gpt2 import GPT2Adapter
from swarm.models.gpt_neox import GPTNeoXAdapter
from swarm.models.gptj import GPTJAdapter
from swarm.models.llama import LlamaAdapter
from swarm.models.opt import OPTAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlamaAdapter,
    GPTNeoXAdapter,
    GPTJAdapter,
    OPTAdapter,
    BloomAdapter,
    FalconAdapter,
    GPT2Adapter,
)


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
