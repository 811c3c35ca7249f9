"""GPT-2: learned positions (added on the client), Conv1D weights stored transposed, a fused qkv."""

from __future__ import annotations

from swarm.models.families import Family
from swarm.models.spec import ConfigReader, LocalSpec, ModelSpec, activation
from swarm.models.weights import Source, tensor, transformed


def _t(weight):  # Conv1D keeps [in, out]; a linear layer wants [out, in]
    return weight.t()


def spec(config: ConfigReader) -> ModelSpec:
    hidden = int(config.require("n_embd", "hidden_size"))
    heads = int(config.require("n_head", "num_attention_heads"))
    return ModelSpec(
        model_type="gpt2",
        num_layers=int(config.require("n_layer", "num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=int(config.require("vocab_size")),
        max_positions=int(config.get("n_positions", "max_position_embeddings", default=1024)),
        norm="layer",
        norm_eps=float(config.get("layer_norm_epsilon", default=1e-5)),
        residual="sequential",
        mlp="plain",
        activation=activation(config.get("activation_function", default="gelu_new")),
        intermediate_size=int(config.get("n_inner", default=4 * hidden)),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        attention_scale=None if config.get("scale_attn_weights", default=True) else 1.0,
        scale_by_layer=bool(config.get("scale_attn_by_inverse_layer_idx", default=False)),
        local=LocalSpec(learned_positions=True, tied_head=bool(config.get("tie_word_embeddings", default=True))),
    )


def layer_sources(spec: ModelSpec, index: int, prefix: str) -> dict[str, Source]:
    return {
        "attn_norm.weight": tensor(f"{prefix}ln_1.weight"),
        "attn_norm.bias": tensor(f"{prefix}ln_1.bias"),
        "mlp_norm.weight": tensor(f"{prefix}ln_2.weight"),
        "mlp_norm.bias": tensor(f"{prefix}ln_2.bias"),
        "qkv.weight": transformed(f"{prefix}attn.c_attn.weight", _t),
        "qkv.bias": tensor(f"{prefix}attn.c_attn.bias"),
        "out.weight": transformed(f"{prefix}attn.c_proj.weight", _t),
        "out.bias": tensor(f"{prefix}attn.c_proj.bias"),
        "up.weight": transformed(f"{prefix}mlp.c_fc.weight", _t),
        "up.bias": tensor(f"{prefix}mlp.c_fc.bias"),
        "down.weight": transformed(f"{prefix}mlp.c_proj.weight", _t),
        "down.bias": tensor(f"{prefix}mlp.c_proj.bias"),
    }


def local_sources(spec: ModelSpec) -> dict[str, Source]:
    return {
        "embed.weight": tensor("transformer.wte.weight"),
        "positions.weight": tensor("transformer.wpe.weight"),
        "final_norm.weight": tensor("transformer.ln_f.weight"),
        "final_norm.bias": tensor("transformer.ln_f.bias"),
        "head.weight": tensor("transformer.wte.weight" if spec.local.tied_head else "lm_head.weight"),
    }


FAMILY = Family(("gpt2",), spec, "transformer.h.{i}.", layer_sources, local_sources)
