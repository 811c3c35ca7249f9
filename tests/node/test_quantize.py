"""int8 weights: about a quarter of float32's memory, and text that stays close to the float model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.default_model import default_model_path
from swarm.node.span import LoadedSpan
from tests.checkpoints import build_tiny

IDS = torch.tensor([[1, 384, 385, 260, 353, 11, 400, 402, 15, 300]])


def span_logits(model: AutoModelForCausalLM, span: LoadedSpan) -> torch.Tensor:
    positions = torch.arange(IDS.shape[1])[None]
    mask = torch.ones_like(IDS, dtype=torch.bool)
    with torch.no_grad():
        embeds = model.model.embed_tokens(IDS).to(span.dtype)
        hidden = span.forward_stateless(embeds, positions, mask, 0, span.end).float()
        return model.lm_head(model.model.norm(hidden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_are_smaller_and_agree_with_float_weights(dtype: torch.dtype) -> None:
    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    float_span = LoadedSpan.load(path, 0, 8, torch.device("cpu"), dtype, show_progress=False)
    int8_span = LoadedSpan.load(path, 0, 8, torch.device("cpu"), dtype, show_progress=False, quantize="int8")
    linears = [m for m in int8_span.stack.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8 * 4  # fused qkv, output, fused gate and up, down
    assert all(m.weight.__class__.__name__ == "Int8Tensor" for m in linears)
    linear_bytes = sum(m.weight.numel() * dtype.itemsize for m in linears)
    saved = float_span.weight_bytes - int8_span.weight_bytes
    assert saved > 0.6 * linear_bytes * (1 - 1 / dtype.itemsize), (saved, linear_bytes)

    exact = span_logits(reference, float_span)
    approx = span_logits(reference, int8_span)
    error = (approx - exact).abs().max().item()
    agreement = (approx.argmax(-1) == exact.argmax(-1)).float().mean().item()
    scale = exact.abs().max().item()
    assert 0 < error < 0.1 * scale and agreement >= 0.8, (error, scale, agreement)


def test_unknown_quantization_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match="int4"):
        LoadedSpan.load(
            default_model_path(), 0, 1, torch.device("cpu"), torch.float32, show_progress=False, quantize="int4"
        )


def test_int8_reaches_the_experts_of_a_mixture_of_experts(tmp_path: Path) -> None:
    """Experts hold most of a mixture-of-experts model's weights: each is a pair of linear layers, quantized
    like a dense MLP's."""
    checkpoint = build_tiny("mixtral", tmp_path / "mixtral")
    cpu = torch.device("cpu")
    exact = LoadedSpan.load(checkpoint, 0, 2, cpu, torch.float32, show_progress=False)
    int8 = LoadedSpan.load(checkpoint, 0, 2, cpu, torch.float32, show_progress=False, quantize="int8")
    experts = [module for layer in int8.stack.layers for module in (*layer.mlp.gate_up, *layer.mlp.down)]
    assert len(experts) == 2 * 2 * 4  # two layers of four experts, each a gate-and-up and a down projection
    assert all(module.weight.__class__.__name__ == "Int8Tensor" for module in experts)
    hidden = torch.randn(1, 6, exact.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6)[None]
    mask = torch.ones(1, 6, dtype=torch.bool)
    reference = exact.forward_stateless(hidden, positions, mask, 0, 2)
    approx = int8.forward_stateless(hidden, positions, mask, 0, 2)
    assert 0 < (approx - reference).abs().max().item() < 0.05 * reference.abs().max().item()
