"""GPT-J: rotary positions over the first `rotary_dim` of each head.

transformers 5.24 moved the sinusoid table from each attention layer to one model-level rotary module;
`swarm.transformers_compat` finds which layout the installed release builds."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from swarm.models.base import ModelAdapter
from swarm.transformers_compat import gptj_rotary_class, restore_gptj_sinusoids


class GPTJAdapter(ModelAdapter):
    model_types = ("gptj",)
    layers_path = "transformer.h"
    embed_path = "transformer.wte"
    final_norm_path = "transformer.ln_f"

    def build_span_extras(self, skeleton: PreTrainedModel, device: torch.device) -> nn.ModuleDict:
        rotary_class = gptj_rotary_class(skeleton)
        if rotary_class is None:
            return nn.ModuleDict()
        with torch.device(device):
            return nn.ModuleDict({"rotary": rotary_class(self.config)})

    def restore_buffers(self, layers: nn.ModuleList, device: torch.device) -> None:
        restore_gptj_sinusoids(layers, device)

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
        inputs: dict[str, object] = {
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
        }
        if "rotary" in extras:
            inputs["position_embeddings"] = extras["rotary"](hidden, position_ids=position_ids)
        return inputs
