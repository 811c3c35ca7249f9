"""swarm client: run a model whose layers are served by peers, through Hugging Face's API."""

from __future__ import annotations

from typing import TYPE_CHECKING

import swarm  # noqa: F401 - first: it quiets torchao's import-time warnings before transformers pulls it in

if TYPE_CHECKING:
    from client.model import DistributedModelForCausalLM

__all__ = ["DistributedModelForCausalLM"]


def __getattr__(name: str) -> object:
    """Import the model (torch, transformers: seconds) only when it is asked for, so that `swarm-client --help`
    and the commands that never load a model start at once."""
    if name == "DistributedModelForCausalLM":
        from client.model import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    raise AttributeError(f"module 'client' has no attribute {name!r}")
