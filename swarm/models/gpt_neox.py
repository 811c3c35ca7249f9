"""GPT-NeoX (Pythia): rotary attention over part of each head, parallel or sequential residuals."""

from __future__ import annotations

import torch
from torch import nn

from swarm.models.base import ModelAdapter


class GPTNeoXAdapter(ModelAdapter):
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    embed_path = "gpt_neox.embed_in"
    final_norm_path = "gpt_neox.final_layer_norm"
    rotary_path = "gpt_neox.rotary_emb"

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
        position_embeddings = extras["rotary"](hidden, position_ids=position_ids)
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
            "position_embeddings": position_embeddings,
        }
