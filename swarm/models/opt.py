"""OPT: learned positions offset by 2, optional projections around the layers (e.g. opt-350m)."""

from __future__ import annotations

import torch
from torch import nn

from swarm.models.base import ModelAdapter
from swarm.transformers_compat import opt_removes_final_norm


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    embed_path = "model.decoder.embed_tokens"
    final_norm_path = "model.decoder.final_layer_norm"

    def local_module_paths(self) -> dict[str, str]:
        """Only the modules this config builds: some checkpoints project embeddings or drop the final norm."""
        config = self.config
        paths = {"embed": self.embed_path, "positions": "model.decoder.embed_positions", "lm_head": self.lm_head_path}
        if config.word_embed_proj_dim != config.hidden_size:
            paths |= {"project_in": "model.decoder.project_in", "project_out": "model.decoder.project_out"}
        if config.do_layer_norm_before and not opt_removes_final_norm(config):
            paths["final_norm"] = self.final_norm_path
        return paths

    def embed(self, local: nn.ModuleDict, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """`OPTLearnedPositionalEmbedding` takes the given positions and adds its offset itself."""
        if "project_in" in local:
            inputs_embeds = local["project_in"](inputs_embeds)
        return inputs_embeds + local["positions"](None, position_ids=position_ids)

    def logits(self, local: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        if "final_norm" in local:
            hidden = local["final_norm"](hidden)
        if "project_out" in local:
            hidden = local["project_out"](hidden)
        return local["lm_head"](hidden)

    def layer_inputs(
        self,
        extras: nn.ModuleDict,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: object | None,
        first_layer: int,
    ) -> dict[str, object]:
        mask = self.causal_mask(hidden, attention_mask, cache, None, first_layer)
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
        }
