"""What a decoder layer of some family computes, as data: one `ModelSpec` drives every family's block.

The families differ in a handful of choices (norm, positions, attention layout, MLP, residual layout, biases);
each family module turns a checkpoint's `config.json` into these choices and names where each weight lives in
the checkpoint. Nothing here imports transformers: a node reads `config.json` and safetensors, nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from swarm.errors import CheckpointError, UnsupportedModelError

Norm = Literal["rms", "layer"]
Residual = Literal["sequential", "parallel", "parallel_two_norms", "post_norm"]
"""How a layer adds its attention and MLP to the residual stream:
- sequential: x += attn(norm1(x)); x += mlp(norm2(x))   (Llama, GPT-2, OPT, BLOOM, Falcon sequential)
- parallel: x += attn(norm1(x)) + mlp(norm1(x))         (GPT-J, old Falcon)
- parallel_two_norms: x += attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX, new Falcon)
- post_norm: x = norm1(x + attn(x)); x = norm2(x + mlp(x)) (OPT-350m)"""
Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
MLPKind = Literal["gated", "plain"]


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of rotary embeddings: `linear` divides positions by `factor`; `llama3` rescales the low
    frequencies (Llama 3.1's long context)."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class Rotary:
    dim: int
    """How many of each head's dimensions rotate (all of them, or the first part: GPT-NeoX, GPT-J)."""
    base: float = 10000.0
    interleaved: bool = False
    """GPT-J rotates neighbouring pairs (0,1), (2,3)...; the others rotate the two halves against each other."""
    scaling: RopeScaling | None = None


@dataclass(frozen=True)
class MoE:
    """A mixture of experts in place of the MLP: a router picks `top_k` of `experts` gated MLPs per token."""

    experts: int
    top_k: int
    intermediate_size: int
    normalize: bool
    """Renormalize the chosen experts' weights to sum to one (Mixtral always; Qwen3-MoE by `norm_topk_prob`)."""
    dense_layers: frozenset[int] = frozenset()
    """Layers that keep a dense MLP (Qwen3-MoE's `mlp_only_layers` and `decoder_sparse_step`)."""
    weights_in_input_dtype: bool = True
    """Qwen3-MoE casts the routing weights to the hidden states' dtype; Mixtral keeps them in float32."""


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    norm: Norm
    norm_eps: float
    residual: Residual
    mlp: MLPKind
    activation: Activation
    intermediate_size: int
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True
    """LayerNorms with a bias (all of ours but Llama-style RMSNorm, which never has one)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before the rotation (Qwen3)."""
    rotary: Rotary | None = None
    alibi: bool = False
    alibi_scale: float = 1.0
    """ALiBi biases are added to the scaled scores times this (BLOOM 1; Falcon scales them like the scores)."""
    attention_scale: float | None = None
    """Score scale; None is 1/sqrt(head_dim)."""
    scale_by_layer: bool = False
    """GPT-2's `scale_attn_by_inverse_layer_idx`: layer i divides its scores by i + 1 as well."""
    sliding_window: int | None = None
    moe: MoE | None = None
    residual_from_norm: bool = False
    """BLOOM's `apply_residual_connection_post_layernorm`: the residual is the normed input."""
    local: LocalSpec = field(default_factory=lambda: LocalSpec())

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def layer_has_moe(self, index: int) -> bool:
        return self.moe is not None and index not in self.moe.dense_layers


@dataclass(frozen=True)
class LocalSpec:
    """The client's side of the model: what happens before the first layer and after the last."""

    learned_positions: bool = False
    position_offset: int = 0
    """OPT's learned positions start at index 2."""
    embed_norm: bool = False
    """BLOOM normalizes the embeddings before the first layer."""
    projection: int | None = None
    """OPT-350m embeds in this width and projects in and out of the layers' width."""
    final_norm: bool = True
    tied_head: bool = False
    head_bias: bool = False
    """GPT-J's LM head adds a bias."""


class ConfigReader:
    """`config.json` as a checkpoint has it, newest key names first: releases of transformers renamed several
    (`rope_theta` -> `rope_parameters`, GPT-NeoX's `rotary_pct`), and published checkpoints keep the old ones."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    @classmethod
    def open(cls, folder: str | Path) -> ConfigReader:
        path = Path(folder).expanduser() / "config.json"
        try:
            return cls(json.loads(path.read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent} has no config.json; is it a Hugging Face checkpoint?") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None

    @property
    def model_type(self) -> str:
        return str(self.values.get("model_type", ""))

    def get(self, *names: str, default: Any = None) -> Any:
        for name in names:
            if self.values.get(name) is not None:
                return self.values[name]
        return default

    def require(self, *names: str) -> Any:
        value = self.get(*names)
        if value is None:
            raise CheckpointError(f"config.json of this {self.model_type} checkpoint lacks {' / '.join(names)}")
        return value

    def rope(self) -> dict[str, Any]:
        """Rotary settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older)."""
        parameters = dict(self.values.get("rope_parameters") or {})
        scaling = self.values.get("rope_scaling") or {}
        merged = {**scaling, **parameters}
        if "rope_theta" not in merged and self.get("rope_theta", "rotary_emb_base") is not None:
            merged["rope_theta"] = self.get("rope_theta", "rotary_emb_base")
        if "partial_rotary_factor" not in merged and self.get("partial_rotary_factor", "rotary_pct") is not None:
            merged["partial_rotary_factor"] = self.get("partial_rotary_factor", "rotary_pct")
        return merged

    def rotary(self, head_dim: int) -> Rotary:
        rope = self.rope()
        kind = rope.get("rope_type", rope.get("type", "default"))
        dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
        scaling: RopeScaling | None = None
        if kind == "linear":
            scaling = RopeScaling("linear", float(rope["factor"]))
        elif kind == "llama3":
            scaling = RopeScaling(
                "llama3",
                float(rope["factor"]),
                float(rope.get("low_freq_factor", 1.0)),
                float(rope.get("high_freq_factor", 4.0)),
                int(rope.get("original_max_position_embeddings", 8192)),
            )
        elif kind != "default":
            raise UnsupportedModelError(
                f"rotary scaling {kind!r} of this {self.model_type} checkpoint is not supported "
                "(supported: default, linear, llama3)"
            )
        return Rotary(dim=dim, base=float(rope.get("rope_theta", 10000.0)), scaling=scaling)


def activation(name: str) -> Activation:
    """A config's activation name as one of the four this runtime computes."""
    known: dict[str, Activation] = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "bloom_gelu": "gelu_tanh",
        "relu": "relu",
    }
    if name not in known:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {', '.join(known)}")
    return known[name]
