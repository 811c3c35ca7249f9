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

from swarm.errors import IncompatibleTransformersError
from swarm.transformers_compat import (
    attention_implementation,
    causal_mask,
    layer_cache_keyword,
    set_attention_implementation,
)


class ModelAdapter(ABC):
    """One family: where its layers and local modules live, and how a span of layers runs."""

    model_types: ClassVar[tuple[str, ...]]
    layers_path: ClassVar[str]
    embed_path: ClassVar[str]
    final_norm_path: ClassVar[str]
    lm_head_path: ClassVar[str] = "lm_head"
    rotary_path: ClassVar[str | None] = None

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def skeleton(self) -> PreTrainedModel:
        """The whole model on the meta device: free to build, and the source of every module we use.

        Its layers use the attention kernel a local `from_pretrained` picks in this release (SDPA where the
        family has it, eager otherwise); the span's masks are then built for the same kernel."""
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config)
        set_attention_implementation(self.config, attention_implementation(model.config))
        return model

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
        return causal_mask(
            self.config,
            cache,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
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
        A layer that leaves `cache` as it was (it took the cache under another name) is an error, not a
        silently stateless step.
        """
        inputs = self.layer_inputs(extras, hidden, position_ids, attention_mask, cache, first_layer)
        inputs[layer_cache_keyword(layers[0])] = cache
        before = _cached_lengths(cache, first_layer, len(layers))
        for layer in layers:
            output = layer(hidden, **inputs)
            hidden = output[0] if isinstance(output, tuple) else output  # some families return (hidden, weights)
        after = _cached_lengths(cache, first_layer, len(layers))
        if any(new != old + hidden.shape[1] for old, new in zip(before, after, strict=True)):
            raise IncompatibleTransformersError(
                f"layers {first_layer}-{first_layer + len(layers) - 1} did not update their cache "
                f"(lengths {before} -> {after} for {hidden.shape[1]} new tokens)"
            )
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
        """The keyword arguments every layer of the span gets besides the hidden states and the cache, in the
        family's own names: its mask exactly as its model builds it, positions, and rotary or ALiBi terms."""


def _cached_lengths(cache: object | None, first_layer: int, count: int) -> list[int]:
    """Tokens each of the span's cache layers has seen (sliding windows count every token, kept or not)."""
    if cache is None:
        return []
    return [cache.layers[index].get_seq_length() for index in range(first_layer, first_layer + count)]  # type: ignore[attr-defined]
