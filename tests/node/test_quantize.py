"""int8 weights: a quarter of the memory, and text that stays close to the float model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from node.span import LoadedSpan
from swarm.default_model import default_model_path


def test_int8_layers_are_smaller_and_agree_with_float_weights() -> None:
    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    float_span = LoadedSpan.load(path, 0, 8, torch.device("cpu"), torch.float32, show_progress=False)
    int8_span = LoadedSpan.load(path, 0, 8, torch.device("cpu"), torch.float32, show_progress=False, quantize="int8")
    quantized = torch.ao.nn.quantized.dynamic.Linear
    assert not any(isinstance(m, torch.nn.Linear) for m in int8_span.layers.modules())
    assert sum(isinstance(m, quantized) for m in int8_span.layers.modules()) == 8 * 7

    ids = torch.tensor([[1, 384, 385, 260, 353, 11, 400, 402, 15, 300]])
    positions = torch.arange(ids.shape[1])[None]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        embeds = reference.model.embed_tokens(ids)
        exact = reference.lm_head(reference.model.norm(float_span.forward(embeds, positions, mask, None, 0, 8)))
        approx = reference.lm_head(reference.model.norm(int8_span.forward(embeds, positions, mask, None, 0, 8)))
    error = (approx - exact).abs().max().item()
    agreement = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
    scale = exact.abs().max().item()
    assert 0 < error < 0.1 * scale and agreement >= 0.8, (error, scale, agreement)


def test_int8_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="float32"):
        LoadedSpan.load(
            default_model_path(), 0, 1, torch.device("cpu"), torch.bfloat16, show_progress=False, quantize="int8"
        )
