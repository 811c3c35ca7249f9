"""What training through the swarm must equal, computed in one process.

- `HFSoftPromptModel`: local `transformers` with a soft prompt as `inputs_embeds` in front (no swarm code at all).
- `LocalTunedModel`: swarm's own layers, every one of them in this process, with plain autograd (no recomputation,
  no wire, no hops): what the distributed pass must reproduce, for soft prompts and adapters alike.
- `merge_adapter`: a `transformers` model with an adapter's low-rank products added to its q/k/v/o weights (Llama
  layout), the standard meaning of LoRA, for checking inference with an adapter against transformers.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from swarm.checkpoint import CheckpointIndex
from swarm.client.core.tuning import Tuning
from swarm.models import ModelArchitecture
from swarm.models.adapters import LayerAdapters, LowRank, RowAdapter
from swarm.models.attention import StatelessAttention
from swarm.models.local import LocalModules
from swarm.models.stack import LayerStack

IGNORED = -100


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the labels that count (transformers' causal LM loss)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORED
    )


class HFSoftPromptModel:
    """`model(input_ids=, attention_mask=, labels=, tuning=)` on a local transformers model: the tuning's soft
    prompt embeddings go in front of the token embeddings; logits and loss cover the real tokens only."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def __call__(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None, tuning: Tuning
    ) -> SimpleNamespace:
        assert tuning.soft_prompt is not None and tuning.adapter is None
        prompt = tuning.soft_prompt.embeddings
        batch, tokens = input_ids.shape
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat([prompt[None].expand(batch, -1, -1).to(embeds.dtype), embeds], dim=1)
        mask = torch.ones(batch, tokens, dtype=torch.long) if attention_mask is None else attention_mask
        mask = torch.cat([torch.ones(batch, prompt.shape[0], dtype=mask.dtype), mask], dim=1)
        logits = self.model(inputs_embeds=embeds, attention_mask=mask).logits[:, -tokens:]
        loss = shifted_loss(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


class LocalTunedModel:
    """Swarm's own decoder over all layers of `checkpoint` in this process, run like the swarm runs a tuning."""

    def __init__(self, checkpoint: Path) -> None:
        self.architecture = ModelArchitecture.of(checkpoint)
        self.local = LocalModules.load(checkpoint, self.architecture, torch.float32)
        layers = self.architecture.num_layers
        self.stack = LayerStack.load(
            CheckpointIndex.open(checkpoint), self.architecture, 0, layers, torch.device("cpu"), torch.float32
        )

    def __call__(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None, tuning: Tuning
    ) -> SimpleNamespace:
        batch, tokens = input_ids.shape
        mask = torch.ones(batch, tokens, dtype=torch.long) if attention_mask is None else attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        embeds = self.local.embed(input_ids)
        prompt = tuning.soft_prompt
        if prompt is not None:
            count = prompt.tokens
            embeds = torch.cat([prompt.embeddings[None].expand(batch, -1, -1), embeds], dim=1)
            positions = torch.cat([torch.arange(count).expand(batch, -1), positions + count], dim=1)
            mask = torch.cat([torch.ones(batch, count, dtype=mask.dtype), mask], dim=1)
        hidden = self.local.first_hidden(embeds, positions)
        rows = None
        if tuning.adapter is not None:
            adapter = tuning.adapter
            pairs = {(layer, target): LowRank(a, b) for layer, target, a, b in adapter.pairs_in(0, self.stack.end)}
            rows = [RowAdapter(0, batch, LayerAdapters(adapter.alpha / adapter.rank, pairs))]
        attention = StatelessAttention(self.architecture.spec, mask.bool(), positions, torch.float32)
        hidden = self.stack(hidden, positions, attention, 0, self.stack.end, rows)
        logits = self.local.logits(hidden[:, -tokens:]).float()
        loss = shifted_loss(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


def merge_adapter(model: PreTrainedModel, tuning: Tuning) -> PreTrainedModel:
    """`model` (a Llama) with W += alpha/rank * B A on q, k, v (rows of the fused B in that order) and o."""
    adapter = tuning.adapter
    assert adapter is not None
    scale = adapter.alpha / adapter.rank
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    sizes = [config.num_attention_heads * head_dim, *[config.num_key_value_heads * head_dim] * 2]
    with torch.no_grad():
        for layer, target, a, b in adapter.pairs_in(0, config.num_hidden_layers):
            attention = model.model.layers[layer].self_attn
            delta = scale * (b @ a)
            if target == "out":
                attention.o_proj.weight += delta
                continue
            for projection, part in zip(
                (attention.q_proj, attention.k_proj, attention.v_proj), delta.split(sizes), strict=True
            ):
                projection.weight += part
    return model
