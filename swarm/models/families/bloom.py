"""BLOOM: ALiBi instead of positions, a LayerNorm on the embeddings (client side), a fused per-head qkv."""

from __future__ import annotations

from swarm.models.families import Family
from swarm.models.spec import ConfigReader, LocalSpec, ModelSpec
from swarm.models.weights import Source, heads_interleaved, tensor, transformed


def spec(config: ConfigReader) -> ModelSpec:
    hidden = int(config.require("hidden_size", "n_embed"))
    heads = int(config.require("n_head", "num_attention_heads"))
    return ModelSpec(
        model_type="bloom",
        num_layers=int(config.require("n_layer", "num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=int(config.require("vocab_size")),
        max_positions=int(config.get("seq_length", "max_position_embeddings", default=2048)),
        norm="layer",
        norm_eps=float(config.get("layer_norm_epsilon", default=1e-5)),
        residual="sequential",
        residual_from_norm=bool(config.get("apply_residual_connection_post_layernorm", default=False)),
        mlp="plain",
        activation="gelu_tanh",
        intermediate_size=4 * hidden,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        alibi=True,
        local=LocalSpec(embed_norm=True, tied_head=bool(config.get("tie_word_embeddings", default=True))),
    )


def layer_sources(spec: ModelSpec, index: int, prefix: str) -> dict[str, Source]:
    attn = f"{prefix}self_attention."
    reorder = heads_interleaved(spec.num_heads, (1, 1, 1), spec.head_dim)
    return {
        "attn_norm.weight": tensor(f"{prefix}input_layernorm.weight"),
        "attn_norm.bias": tensor(f"{prefix}input_layernorm.bias"),
        "mlp_norm.weight": tensor(f"{prefix}post_attention_layernorm.weight"),
        "mlp_norm.bias": tensor(f"{prefix}post_attention_layernorm.bias"),
        "qkv.weight": transformed(f"{attn}query_key_value.weight", reorder),
        "qkv.bias": transformed(f"{attn}query_key_value.bias", reorder),
        "out.weight": tensor(f"{attn}dense.weight"),
        "out.bias": tensor(f"{attn}dense.bias"),
        "up.weight": tensor(f"{prefix}mlp.dense_h_to_4h.weight"),
        "up.bias": tensor(f"{prefix}mlp.dense_h_to_4h.bias"),
        "down.weight": tensor(f"{prefix}mlp.dense_4h_to_h.weight"),
        "down.bias": tensor(f"{prefix}mlp.dense_4h_to_h.bias"),
    }


def local_sources(spec: ModelSpec) -> dict[str, Source]:
    embed = "transformer.word_embeddings.weight"
    return {
        "embed.weight": tensor(embed),
        "embed_norm.weight": tensor("transformer.word_embeddings_layernorm.weight"),
        "embed_norm.bias": tensor("transformer.word_embeddings_layernorm.bias"),
        "final_norm.weight": tensor("transformer.ln_f.weight"),
        "final_norm.bias": tensor("transformer.ln_f.bias"),
        "head.weight": tensor(embed if spec.local.tied_head else "lm_head.weight"),
    }


FAMILY = Family(("bloom",), spec, "transformer.h.{i}.", layer_sources, local_sources)
