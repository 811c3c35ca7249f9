"""Falcon, both layouts: the old one (`new_decoder_architecture=False`, multi-query, rotary or ALiBi) and the
new one (grouped KV heads, two layer norms)."""

from __future__ import annotations

import math

import torch
from torch import nn

from swarm.models.base import ModelAdapter
from swarm.transformers_compat import build_alibi_tensor


class FalconAdapter(ModelAdapter):
    model_types = ("falcon",)
    layers_path = "transformer.h"
    embed_path = "transformer.word_embeddings"
    final_norm_path = "transformer.ln_f"
    rotary_path = "transformer.rotary_emb"

    def layer_inputs(
        self,
        extras: nn.ModuleDict,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: object | None,
        first_layer: int,
    ) -> dict[str, object]:
        alibi = None
        mask = self.causal_mask(hidden, attention_mask, cache, None, first_layer, allow_is_causal_skip=False)
        if self.config.alibi:
            alibi = build_alibi_tensor(attention_mask, self.config.num_attention_heads, dtype=hidden.dtype)
            mask = self._alibi_mask(mask, alibi, hidden)
        position_embeddings = extras["rotary"](hidden, position_ids=position_ids)
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
            "alibi": alibi,
            "position_embeddings": position_embeddings,
        }

    def _alibi_mask(self, causal_mask: torch.Tensor, alibi: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """SDPA takes ALiBi inside the additive mask, scaled like the scores. `FalconModel.forward` builds it
        inline (no helper to call), so this mirrors it: the bias where the boolean mask allows, else the minimum."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        bias = alibi.reshape(hidden.shape[0], -1, *alibi.shape[1:]) / math.sqrt(head_dim)
        return torch.masked_fill(bias, ~causal_mask, torch.finfo(hidden.dtype).min)
