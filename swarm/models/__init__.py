"""swarm's own model runtime: one config-driven decoder layer for every supported family.

`ModelArchitecture.of(path)` reads a checkpoint's `config.json` into a `ModelSpec` and picks its family's name
map; nodes build `DecoderLayer`s of their span from it, the client its `LocalModules`. transformers is not
imported here: it is the test oracle and the client's `generate()`, never the node's model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from swarm.errors import UnsupportedModelError
from swarm.models.families import Family, bloom, falcon, gpt2, gpt_neox, gptj, llama, opt
from swarm.models.spec import ConfigReader, ModelSpec

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    gpt_neox.FAMILY,
    gptj.FAMILY,
    opt.FAMILY,
    bloom.FAMILY,
    falcon.FAMILY,
    gpt2.FAMILY,
)


def supported_model_types() -> list[str]:
    return sorted(model_type for family in FAMILIES for model_type in family.model_types)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
    )


@dataclass(frozen=True)
class ModelArchitecture:
    """A checkpoint's family and what its layers compute."""

    family: Family
    spec: ModelSpec
    stored_dtype: str | None = None
    """The dtype the checkpoint's weights were saved in (`float32`, `bfloat16`...), if its config says."""

    @classmethod
    def of(cls, model: str | Path) -> ModelArchitecture:
        return cls.from_config(ConfigReader.open(model))

    @classmethod
    def from_config(cls, config: ConfigReader) -> ModelArchitecture:
        family = family_for(config.model_type)
        return cls(family, family.spec(config), config.get("dtype", "torch_dtype"))

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    def layer_prefix(self, index: int) -> str:
        return self.family.layer_prefix.format(i=index)


__all__ = ["FAMILIES", "ModelArchitecture", "ModelSpec", "family_for", "supported_model_types"]
