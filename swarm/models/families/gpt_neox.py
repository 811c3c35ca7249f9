"""GPT-NeoX (Pythia): LayerNorm, rotary over part of each head, a fused per-head qkv, parallel residuals."""

from __future__ import annotations

from swarm.models.families import Family
from swarm.models.spec import ConfigReader, LocalSpec, ModelSpec, activation
from swarm.models.weights import Source, heads_interleaved, tensor, transformed


def spec(config: ConfigReader) -> ModelSpec:
    hidden = int(config.require("hidden_size"))
    heads = int(config.require("num_attention_heads"))
    head_dim = hidden // heads
    bias = bool(config.get("attention_bias", default=True))
    return ModelSpec(
        model_type="gpt_neox",
        num_layers=int(config.require("num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        vocab_size=int(config.require("vocab_size")),
        max_positions=int(config.get("max_position_embeddings", default=2048)),
        norm="layer",
        norm_eps=float(config.get("layer_norm_eps", default=1e-5)),
        residual="parallel_two_norms" if config.get("use_parallel_residual", default=True) else "sequential",
        mlp="plain",
        activation=activation(config.get("hidden_act", default="gelu")),
        intermediate_size=int(config.get("intermediate_size", default=4 * hidden)),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=True,
        rotary=config.rotary(head_dim),
        local=LocalSpec(tied_head=bool(config.get("tie_word_embeddings", default=False))),
    )


def layer_sources(spec: ModelSpec, index: int, prefix: str) -> dict[str, Source]:
    reorder = heads_interleaved(spec.num_heads, (1, 1, 1), spec.head_dim)
    sources = {
        "attn_norm.weight": tensor(f"{prefix}input_layernorm.weight"),
        "attn_norm.bias": tensor(f"{prefix}input_layernorm.bias"),
        "mlp_norm.weight": tensor(f"{prefix}post_attention_layernorm.weight"),
        "mlp_norm.bias": tensor(f"{prefix}post_attention_layernorm.bias"),
        "qkv.weight": transformed(f"{prefix}attention.query_key_value.weight", reorder),
        "out.weight": tensor(f"{prefix}attention.dense.weight"),
        "up.weight": tensor(f"{prefix}mlp.dense_h_to_4h.weight"),
        "up.bias": tensor(f"{prefix}mlp.dense_h_to_4h.bias"),
        "down.weight": tensor(f"{prefix}mlp.dense_4h_to_h.weight"),
        "down.bias": tensor(f"{prefix}mlp.dense_4h_to_h.bias"),
    }
    if spec.qkv_bias:
        sources["qkv.bias"] = transformed(f"{prefix}attention.query_key_value.bias", reorder)
        sources["out.bias"] = tensor(f"{prefix}attention.dense.bias")
    return sources


def local_sources(spec: ModelSpec) -> dict[str, Source]:
    head = ("gpt_neox.embed_in.weight",) if spec.local.tied_head else ("embed_out.weight", "lm_head.weight")
    return {
        "embed.weight": tensor("gpt_neox.embed_in.weight"),
        "final_norm.weight": tensor("gpt_neox.final_layer_norm.weight"),
        "final_norm.bias": tensor("gpt_neox.final_layer_norm.bias"),
        "head.weight": tensor(*head),
    }


FAMILY = Family(("gpt_neox",), spec, "gpt_neox.layers.{i}.", layer_sources, local_sources)
