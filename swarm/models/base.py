"""The contract between swarm and one family of checkpoints.

swarm splits a causal LM in two: the transformer layers, which nodes host in spans, and the small
"local" modules (embeddings, final norm, LM head), which the client runs. An adapter names those
pieces inside the `transformers` model of its family and says how to run a span of layers. It
builds the real `transformers` classes on the meta device, so no model code is copied and a new
`transformers` release keeps working as long as the module layout holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask


class ModelAdapter(ABC):
    """One family: where its layers and local modules live, and how a span of layers runs."""

    model_types: ClassVar[tuple[str, ...]]
    layers_path: ClassVar[str]
    embed_path: ClassVar[str]
    final_norm_path: ClassVar[str]
    lm_head_path: ClassVar[str] = "lm_head"
    rotary_path: ClassVar[str | None] = None
    # "eager" for families whose `transformers` layers have no SDPA path (GPT-J, BLOOM).
    attention: ClassVar[str] = "sdpa"

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config
        config._attn_implementation = self.attention

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def skeleton(self) -> PreTrainedModel:
        """The whole model on the meta device: free to build, and the source of every module we use."""
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config, attn_implementation=self.attention)

    def local_module_paths(self) -> dict[str, str]:
        """The client's modules by role (families add theirs, e.g. `positions`); `lm_head` may be tied to `embed`."""
        return {"embed": self.embed_path, "final_norm": self.final_norm_path, "lm_head": self.lm_head_path}

    def embed(self, local: nn.ModuleDict, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first layer, from the token embeddings (`local["embed"]` output, or the
        caller's `inputs_embeds`) and their positions: families add learned positions or an embedding norm here."""
        return inputs_embeds

    def logits(self, local: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        return local["lm_head"](local["final_norm"](hidden))

    def causal_mask(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: object | None,
        position_ids: torch.Tensor | None,
        first_layer: int,
        allow_is_causal_skip: bool = True,
    ) -> object:
        """The mask exactly as the family's own model builds it, sized against the cache of `first_layer`
        (a node's cache only holds its own layers). Families whose model passes no positions pass None."""
        return create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=first_layer,
            allow_is_causal_skip=allow_is_causal_skip,
        )

    def build_span_extras(self, skeleton: PreTrainedModel, device: torch.device) -> nn.ModuleDict:
        """Parameter-free modules a span needs besides its layers: the family's own rotary module, if any.

        Built on the real device, since its buffers are computed at construction and are not in the checkpoint."""
        if self.rotary_path is None:
            return nn.ModuleDict()
        rotary_class = type(skeleton.get_submodule(self.rotary_path))
        with torch.device(device):
            return nn.ModuleDict({"rotary": rotary_class(config=self.config)})

    def restore_buffers(self, layers: nn.ModuleList, device: torch.device) -> None:
        """Recompute the layers' non-persistent buffers: the checkpoint lacks them, so loading leaves them on meta.

        Families whose layers have such buffers override this; the others must have none left."""
        left = [name for name, buffer in layers.named_buffers() if buffer.is_meta]
        if left:
            raise NotImplementedError(f"{type(self).__name__} does not restore the layer buffers {left}")

    def run_span(
        self,
        layers: list[nn.Module],
        extras: nn.ModuleDict,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: object | None,
        first_layer: int,
    ) -> torch.Tensor:
        """Run `layers` (global indices from `first_layer`) over new positions, updating `cache`.

        `attention_mask` is the 2D padding mask over everything the cache holds plus the new positions.
        """
        inputs = self.layer_inputs(extras, hidden, position_ids, attention_mask, cache, first_layer)
        for layer in layers:
            output = layer(hidden, **inputs)
            hidden = output[0] if isinstance(output, tuple) else output  # some families return (hidden, weights)
        return hidden

    @abstractmethod
    def layer_inputs(
        self,
        extras: nn.ModuleDict,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: object | None,
        first_layer: int,
    ) -> dict[str, object]:
        """The keyword arguments every layer of the span gets besides the hidden states, in the family's own
        names: its mask exactly as its model builds it, positions, the cache, and rotary or ALiBi terms."""
