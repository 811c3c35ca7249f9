"""One decoder layer for every supported family, driven by a `ModelSpec`.

Queries, keys and values come from one fused projection; the MLP's gate and up projections are fused too. The
layer does not know where its keys and values are kept: it hands the new ones to an `Attention` (the node's
session cache, or a plain causal pass for a stateless forward), which stores them and returns the attention
output. Positions enter as precomputed rotary tables or as an ALiBi bias inside the attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from swarm.models.mlp import DenseMLP, MixtureOfExperts
from swarm.models.rotary import apply_rotary
from swarm.models.spec import ModelSpec


class Attention(Protocol):
    """Where a layer's keys and values live. `q` is [batch, heads, tokens, head_dim]; `k` and `v` are the new
    tokens' [batch, kv_heads, tokens, head_dim]; returns [batch, heads, tokens, head_dim]."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor: ...


@dataclass
class StepContext:
    """What every layer of one forward shares: rotary tables for the new tokens' positions and the attention."""

    attention: Attention
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """Normalized in float32, scaled in the input's dtype (as Llama-style reference models do)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def make_norm(spec: ModelSpec, weights: dict[str, torch.Tensor], name: str) -> nn.Module:
    if spec.norm == "rms":
        return RMSNorm(weights[f"{name}.weight"], spec.norm_eps)
    return LayerNorm(weights[f"{name}.weight"], weights.get(f"{name}.bias"), spec.norm_eps)


def make_linear(weights: dict[str, torch.Tensor], name: str) -> nn.Linear:
    """An `nn.Linear` around loaded tensors (a module, so weight-only quantization can replace its weight)."""
    weight = weights[f"{name}.weight"]
    bias = weights.get(f"{name}.bias")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class DecoderLayer(nn.Module):
    """Layer `index` of a model: attention and MLP (or experts) around the residual stream, as `spec` says."""

    def __init__(self, spec: ModelSpec, index: int, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        self.index = index
        self.attn_norm = make_norm(spec, weights, "attn_norm")
        self.mlp_norm = make_norm(spec, weights, "mlp_norm") if spec.residual != "parallel" else None
        self.qkv = make_linear(weights, "qkv")
        self.out = make_linear(weights, "out")
        self.q_norm = RMSNorm(weights["q_norm.weight"], spec.norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(weights["k_norm.weight"], spec.norm_eps) if spec.qk_norm else None
        self.mlp: nn.Module = (
            MixtureOfExperts(spec, weights) if spec.layer_has_moe(index) else DenseMLP(spec, weights, make_linear)
        )
        self.scale = spec.scale / (index + 1) if spec.scale_by_layer else spec.scale

    def forward(self, x: torch.Tensor, context: StepContext) -> torch.Tensor:
        spec = self.spec
        if spec.residual == "post_norm":
            x = self.attn_norm(x + self.attention(x, context))
            return self.mlp_norm(x + self.mlp(x))  # type: ignore[misc]
        normed = self.attn_norm(x)
        residual = normed if spec.residual_from_norm else x
        attended = self.attention(normed, context)
        if spec.residual == "sequential":
            x = residual + attended
            normed = self.mlp_norm(x)  # type: ignore[misc]
            return (normed if spec.residual_from_norm else x) + self.mlp(normed)
        mlp_in = normed if spec.residual == "parallel" else self.mlp_norm(x)  # type: ignore[misc]
        return (attended + self.mlp(mlp_in)) + residual  # the branches first: the reference's rounding in bf16

    def attention(self, x: torch.Tensor, context: StepContext) -> torch.Tensor:
        spec = self.spec
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).split((spec.q_size, spec.kv_size, spec.kv_size), dim=-1)
        q = q.view(batch, tokens, spec.num_heads, spec.head_dim)
        k = k.view(batch, tokens, spec.num_kv_heads, spec.head_dim)
        v = v.view(batch, tokens, spec.num_kv_heads, spec.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.rotary is not None and context.cos is not None and context.sin is not None:
            q = apply_rotary(q, context.cos, context.sin, spec.rotary)
            k = apply_rotary(k, context.cos, context.sin, spec.rotary)
        out = context.attention(self.index, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale)
        return self.out(out.transpose(1, 2).reshape(batch, tokens, spec.q_size))
