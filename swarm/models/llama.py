"""Llama and every family with its layer shape: Mistral, Qwen2, Qwen3 (GQA and tied embeddings too)."""

from __future__ import annotations

import torch
from torch import nn

from swarm.models.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    layers_path = "model.layers"
    embed_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    rotary_path = "model.rotary_emb"

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
        position_embeddings = extras["rotary"](hidden, position_ids)
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
            "position_embeddings": position_embeddings,
        }
