"""GPT-J: rotary positions from a sinusoid table each attention layer keeps; eager attention only."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

from swarm.models.base import ModelAdapter


class GPTJAdapter(ModelAdapter):
    model_types = ("gptj",)
    layers_path = "transformer.h"
    embed_path = "transformer.wte"
    final_norm_path = "transformer.ln_f"
    attention = "eager"

    def restore_buffers(self, layers: nn.ModuleList, device: torch.device) -> None:
        for layer in layers:
            attention = layer.attn
            table = create_sinusoidal_positions(attention.max_positions, attention.pos_embd_dim)
            attention.embed_positions = table.to(device)

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
            "layer_past": cache,
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
        }
