"""BLOOM: ALiBi instead of positions (built from the 2D padding mask), a norm right after the embeddings."""

from __future__ import annotations

import torch
from torch import nn

from swarm.models.base import ModelAdapter
from swarm.transformers_compat import build_alibi_tensor


class BloomAdapter(ModelAdapter):
    model_types = ("bloom",)
    layers_path = "transformer.h"
    embed_path = "transformer.word_embeddings"
    final_norm_path = "transformer.ln_f"

    def local_module_paths(self) -> dict[str, str]:
        return {**super().local_module_paths(), "embed_norm": "transformer.word_embeddings_layernorm"}

    def embed(self, local: nn.ModuleDict, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return local["embed_norm"](inputs_embeds)

    def layer_inputs(
        self,
        extras: nn.ModuleDict,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: object | None,
        first_layer: int,
    ) -> dict[str, object]:
        """ALiBi spans cache + new tokens and counts real tokens only, so left padding shifts nothing."""
        alibi = build_alibi_tensor(attention_mask, self.config.n_head, dtype=hidden.dtype)
        mask = self.causal_mask(hidden, attention_mask, cache, None, first_layer)
        return {
            "attention_mask": mask,
            "use_cache": cache is not None,
            "alibi": alibi,
        }
