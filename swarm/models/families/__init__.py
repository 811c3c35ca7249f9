"""One module per family: how its `config.json` maps to a `ModelSpec`, and where each weight lives.

Adding a family is a spec function and a name map here, plus a tiny checkpoint in the oracle tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from swarm.models.spec import ConfigReader, ModelSpec
from swarm.models.weights import Source


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    spec: Callable[[ConfigReader], ModelSpec]
    layer_prefix: str
    """Checkpoint prefix of layer i's tensors, with `{i}` (what the memory planner sizes per layer)."""
    layer_sources: Callable[[ModelSpec, int, str], dict[str, Source]]
    """Our parameter name -> its source, for layer `index` whose checkpoint tensors start with `prefix`."""
    local_sources: Callable[[ModelSpec], dict[str, Source]]
    """The client's parameters: `embed`, `head` and, as the spec says, `positions`, `embed_norm`,
    `project_in`, `project_out`, `final_norm` (each `.weight`, some `.bias`)."""

    def sources_of_layer(self, spec: ModelSpec, index: int) -> dict[str, Source]:
        return self.layer_sources(spec, index, self.layer_prefix.format(i=index))
