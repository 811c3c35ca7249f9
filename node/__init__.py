"""swarm node: host a span of a model's layers and serve it to clients."""

import swarm  # noqa: F401 - first: it quiets torchao's import-time warnings before transformers pulls it in
