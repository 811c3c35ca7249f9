"""GPT-2: learned absolute positions (`wpe`), added on the client before the first layer."""

from __future__ import annotations

import torch
from torch import nn

from swarm.models.base import ModelAdapter


class GPT2Adapter(ModelAdapter):
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    embed_path = "transformer.wte"
    final_norm_path = "transformer.ln_f"

    def local_module_paths(self) -> dict[str, str]:
        return {**super().local_module_paths(), "positions": "transformer.wpe"}

    def embed(self, local: nn.ModuleDict, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return inputs_embeds + local["positions"](position_ids)

    def layer_inputs(
        self,
        extras: nn.ModuleDict,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: object | None,
        first_layer: int,
    ) -> dict[str, object]:
        mask = self.causal_mask(hidden, attention_mask, cache, position_ids, first_layer)
        return {
            "attention_mask": mask,
            "use_cache": cache is not None,
            "position_ids": position_ids,
        }
