"""One decoder layer for every supported family, driven by a `ModelSpec`.

Queries, keys and values come from one fused projection; the MLP's gate and up projections are fused too. The
layer does not know where its keys and values are kept: it hands the new ones to an `Attention` (the node's
session cache, or a plain causal pass for a stateless forward), which stores them and returns the attention
output. Positions enter as precomputed rotary tables or as an ALiBi bias inside the attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from swarm.models.adapters import RowAdapter, adapted
from swarm.models.linear import make_linear
from swarm.models.mlp import DenseMLP, MixtureOfExperts
from swarm.models.rotary import apply_rotary
from swarm.models.spec import ModelSpec


class Attention(Protocol):
    """Where a layer's keys and values live. `q` is [batch, heads, tokens, head_dim]; `k` and `v` are the new
    tokens' [batch, kv_heads, tokens, head_dim]; returns [batch, heads, tokens, head_dim]."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor: ...


@dataclass
class StepContext:
    """What every layer of one forward shares: the rotary tables of the new tokens' positions (and the rotation
    they go with), the attention, and the adapters of the rows that have one (`swarm.models.adapters`)."""

    attention: Attention
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    rotation: torch.Tensor | None = None
    adapters: list[RowAdapter] = field(default_factory=list)


class RMSNorm(nn.Module):
    """Normalized in float32, scaled in the input's dtype (as Llama-style reference models do): in float32 one
    fused `rms_norm`, bit-identical to the reference's five operations; otherwise the scale is applied after
    rounding back, where the reference applies it."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.shape = tuple(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)


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
        self.mlp: nn.Module = MixtureOfExperts(spec, weights) if spec.layer_has_moe(index) else DenseMLP(spec, weights)
        self.scale = spec.scale / (index + 1) if spec.scale_by_layer else spec.scale
        self.qk_heads = spec.num_heads + spec.num_kv_heads

    def forward(self, x: torch.Tensor, context: StepContext) -> torch.Tensor:
        """(Submodules are called through `.forward`: a decode step of a small model is made of many tiny
        operations, and `nn.Module.__call__`'s hook checks cost as much as some of them.)"""
        spec = self.spec
        if spec.residual == "post_norm":
            x = self.attn_norm.forward(x + self.attention(x, context))
            return self.mlp_norm.forward(x + self.mlp.forward(x))  # type: ignore[union-attr]
        normed = self.attn_norm.forward(x)
        residual = normed if spec.residual_from_norm else x
        attended = self.attention(normed, context)
        if spec.residual == "sequential":
            x = residual + attended
            normed = self.mlp_norm.forward(x)  # type: ignore[union-attr]
            return (normed if spec.residual_from_norm else x) + self.mlp.forward(normed)
        mlp_in = normed if spec.residual == "parallel" else self.mlp_norm.forward(x)  # type: ignore[union-attr]
        return (attended + self.mlp.forward(mlp_in)) + residual  # the branches first: the reference's rounding

    def attention(self, x: torch.Tensor, context: StepContext) -> torch.Tensor:
        """Queries and keys stay side by side in the fused projection's heads [q..., k..., v...], so the
        rotation turns both in one go."""
        spec = self.spec
        batch, tokens, _ = x.shape
        projected = self.qkv.forward(x)
        if context.adapters:
            projected = adapted(projected, x, self.index, "qkv", context.adapters)
        heads = projected.view(batch, tokens, spec.num_heads + 2 * spec.num_kv_heads, spec.head_dim)
        query_key, v = heads[:, :, : self.qk_heads], heads[:, :, self.qk_heads :]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = query_key.split((spec.num_heads, spec.num_kv_heads), dim=2)
            query_key = torch.cat((self.q_norm.forward(q), self.k_norm.forward(k)), dim=2)
        if context.rotation is not None:
            query_key = apply_rotary(query_key, context.cos, context.sin, context.rotation)  # type: ignore[arg-type]
        q, k = query_key[:, :, : spec.num_heads], query_key[:, :, spec.num_heads :]
        out = context.attention(self.index, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale)
        attended = out.transpose(1, 2).reshape(batch, tokens, spec.q_size)
        if not context.adapters:
            return self.out.forward(attended)
        return adapted(self.out.forward(attended), attended, self.index, "out", context.adapters)
