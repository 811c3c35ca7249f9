"""swarm node: host a span of a model's layers and serve it to clients (`swarm-node`)."""
