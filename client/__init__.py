"""swarm client: run a model whose layers are served by peers, through Hugging Face's API."""

from client.model import DistributedModelForCausalLM

__all__ = ["DistributedModelForCausalLM"]
