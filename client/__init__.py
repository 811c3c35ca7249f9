"""swarm client: run a model whose layers are served by peers, through Hugging Face's API.

`core/` is the client itself, `serve/` the OpenAI-compatible gateway, `cli/` the `swarm-client` commands,
`local_swarm.py` a whole swarm on this machine (the demo, tests and benchmarks start theirs with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.client.core.drafts import load_draft_model
    from swarm.client.core.model import DistributedModelForCausalLM

__all__ = ["DistributedModelForCausalLM", "load_draft_model"]


def __getattr__(name: str) -> object:
    """Import the model (torch, transformers: seconds) only when it is asked for, so that `swarm-client --help`
    and the commands that never load a model start at once."""
    if name == "DistributedModelForCausalLM":
        from swarm.client.core.model import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    if name == "load_draft_model":
        from swarm.client.core.drafts import load_draft_model

        return load_draft_model
    raise AttributeError(f"module 'swarm.client' has no attribute {name!r}")
