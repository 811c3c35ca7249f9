"""OPT: learned positions offset by 2 (added on the client), biases everywhere, ReLU MLP, pre- or post-norm
layers (opt-350m: post-norm, embeddings projected in and out of the layers' width, no final norm)."""

from __future__ import annotations

from swarm.models.families import Family
from swarm.models.spec import ConfigReader, LocalSpec, ModelSpec, activation
from swarm.models.weights import Source, concat, tensor

POSITION_OFFSET = 2


def spec(config: ConfigReader) -> ModelSpec:
    hidden = int(config.require("hidden_size"))
    heads = int(config.require("num_attention_heads"))
    pre_norm = bool(config.get("do_layer_norm_before", default=True))
    bias = bool(config.get("enable_bias", default=True))
    projection = int(config.get("word_embed_proj_dim", default=hidden))
    return ModelSpec(
        model_type="opt",
        num_layers=int(config.require("num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=int(config.require("vocab_size")),
        max_positions=int(config.get("max_position_embeddings", default=2048)),
        norm="layer",
        norm_eps=1e-5,
        residual="sequential" if pre_norm else "post_norm",
        mlp="plain",
        activation=activation(config.get("activation_function", default="relu")),
        intermediate_size=int(config.require("ffn_dim")),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        local=LocalSpec(
            learned_positions=True,
            position_offset=POSITION_OFFSET,
            projection=projection if projection != hidden else None,
            final_norm=pre_norm and not config.get("_remove_final_layer_norm", default=False),
            tied_head=bool(config.get("tie_word_embeddings", default=True)),
        ),
    )


def layer_sources(spec: ModelSpec, index: int, prefix: str) -> dict[str, Source]:
    attn = f"{prefix}self_attn."
    sources = {
        "attn_norm.weight": tensor(f"{prefix}self_attn_layer_norm.weight"),
        "attn_norm.bias": tensor(f"{prefix}self_attn_layer_norm.bias"),
        "mlp_norm.weight": tensor(f"{prefix}final_layer_norm.weight"),
        "mlp_norm.bias": tensor(f"{prefix}final_layer_norm.bias"),
        "qkv.weight": concat(f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
        "out.weight": tensor(f"{attn}out_proj.weight"),
        "up.weight": tensor(f"{prefix}fc1.weight"),
        "down.weight": tensor(f"{prefix}fc2.weight"),
    }
    if spec.qkv_bias:
        sources["qkv.bias"] = concat(f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias")
        sources["out.bias"] = tensor(f"{attn}out_proj.bias")
    if spec.mlp_bias:
        sources["up.bias"] = tensor(f"{prefix}fc1.bias")
        sources["down.bias"] = tensor(f"{prefix}fc2.bias")
    return sources


def local_sources(spec: ModelSpec) -> dict[str, Source]:
    decoder = "model.decoder."
    sources = {
        "embed.weight": tensor(f"{decoder}embed_tokens.weight"),
        "positions.weight": tensor(f"{decoder}embed_positions.weight"),
        "head.weight": tensor(f"{decoder}embed_tokens.weight" if spec.local.tied_head else "lm_head.weight"),
    }
    if spec.local.projection is not None:
        sources["project_in.weight"] = tensor(f"{decoder}project_in.weight")
        sources["project_out.weight"] = tensor(f"{decoder}project_out.weight")
    if spec.local.final_norm:
        sources["final_norm.weight"] = tensor(f"{decoder}final_layer_norm.weight")
        sources["final_norm.bias"] = tensor(f"{decoder}final_layer_norm.bias")
    return sources


FAMILY = Family(("opt",), spec, "model.decoder.layers.{i}.", layer_sources, local_sources)
