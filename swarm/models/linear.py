"""`nn.Linear` modules around loaded tensors: modules, so that weight-only quantization (`--quantize int8`) and
the CPU's packed layout (`swarm.models.packed`) can replace them or their weights after loading."""

from __future__ import annotations

import torch
from torch import nn


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An `nn.Linear` holding `weight` ([out, in]) and `bias` themselves, not copies."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def make_linear(weights: dict[str, torch.Tensor], name: str) -> nn.Linear:
    """The linear layer `name` of a loaded weight map (`{name}.weight`, and `{name}.bias` where it has one)."""
    return linear_from(weights[f"{name}.weight"], weights.get(f"{name}.bias"))
