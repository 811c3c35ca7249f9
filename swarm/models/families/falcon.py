"""Falcon, both layouts: the old one (multi-query or per-head fused qkv, rotary or ALiBi, parallel or sequential
residuals) and the new decoder architecture (grouped KV heads, two LayerNorms in parallel)."""

from __future__ import annotations

import math

from swarm.models.families import Family
from swarm.models.spec import ConfigReader, LocalSpec, ModelSpec, Residual, activation
from swarm.models.weights import Source, heads_interleaved, tensor, transformed


def spec(config: ConfigReader) -> ModelSpec:
    hidden = int(config.require("hidden_size"))
    heads = int(config.require("num_attention_heads"))
    head_dim = hidden // heads
    new = bool(config.get("new_decoder_architecture", default=False))
    if new:
        kv_heads = int(config.get("num_kv_heads", default=heads))
    else:
        kv_heads = 1 if config.get("multi_query", default=True) else heads
    alibi = bool(config.get("alibi", default=False))
    bias = bool(config.get("bias", default=False))
    return ModelSpec(
        model_type="falcon",
        num_layers=int(config.require("num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(config.require("vocab_size")),
        max_positions=int(config.get("max_position_embeddings", default=2048)),
        norm="layer",
        norm_eps=float(config.get("layer_norm_epsilon", default=1e-5)),
        residual=_residual(config, new),
        mlp="plain",
        activation=activation(config.get("activation", default="gelu")),
        intermediate_size=int(config.get("ffn_hidden_size", default=4 * hidden)),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        alibi=alibi,
        alibi_scale=1.0 / math.sqrt(head_dim),
        rotary=None if alibi else config.rotary(head_dim),
        local=LocalSpec(tied_head=bool(config.get("tie_word_embeddings", default=True))),
    )


def _residual(config: ConfigReader, new: bool) -> Residual:
    if new:
        return "parallel" if config.get("num_ln_in_parallel_attn", default=2) == 1 else "parallel_two_norms"
    return "parallel" if config.get("parallel_attn", default=True) else "sequential"


def layer_sources(spec: ModelSpec, index: int, prefix: str) -> dict[str, Source]:
    attn = f"{prefix}self_attention."
    sources: dict[str, Source] = {}
    if spec.residual == "parallel_two_norms":
        norms = {"attn_norm": "ln_attn", "mlp_norm": "ln_mlp"}
    elif spec.residual == "parallel":
        norms = {"attn_norm": "input_layernorm"}
    else:
        norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    for ours, theirs in norms.items():
        sources[f"{ours}.weight"] = tensor(f"{prefix}{theirs}.weight")
        sources[f"{ours}.bias"] = tensor(f"{prefix}{theirs}.bias")
    if spec.num_kv_heads == 1:  # multi-query: all queries, then the one key, then the one value: our layout
        sources["qkv.weight"] = tensor(f"{attn}query_key_value.weight")
        qkv_bias = tensor(f"{attn}query_key_value.bias")
    else:  # per KV group: its queries, its key, its value
        group = spec.num_heads // spec.num_kv_heads
        reorder = heads_interleaved(spec.num_kv_heads, (group, 1, 1), spec.head_dim)
        sources["qkv.weight"] = transformed(f"{attn}query_key_value.weight", reorder)
        qkv_bias = transformed(f"{attn}query_key_value.bias", reorder)
    sources["out.weight"] = tensor(f"{attn}dense.weight")
    sources["up.weight"] = tensor(f"{prefix}mlp.dense_h_to_4h.weight")
    sources["down.weight"] = tensor(f"{prefix}mlp.dense_4h_to_h.weight")
    if spec.qkv_bias:
        sources["qkv.bias"] = qkv_bias
        sources["out.bias"] = tensor(f"{attn}dense.bias")
        sources["up.bias"] = tensor(f"{prefix}mlp.dense_h_to_4h.bias")
        sources["down.bias"] = tensor(f"{prefix}mlp.dense_4h_to_h.bias")
    return sources


def local_sources(spec: ModelSpec) -> dict[str, Source]:
    embed = "transformer.word_embeddings.weight"
    return {
        "embed.weight": tensor(embed),
        "final_norm.weight": tensor("transformer.ln_f.weight"),
        "final_norm.bias": tensor("transformer.ln_f.bias"),
        "head.weight": tensor(embed if spec.local.tied_head else "lm_head.weight"),
    }


FAMILY = Family(("falcon",), spec, "transformer.h.{i}.", layer_sources, local_sources)
