"""GPT-J: one LayerNorm feeding attention and MLP in parallel, rotary over the first `rotary_dim` of each head
rotating neighbouring pairs, an LM head with a bias."""

from __future__ import annotations

from swarm.models.families import Family
from swarm.models.spec import ConfigReader, LocalSpec, ModelSpec, Rotary, activation
from swarm.models.weights import Source, concat, tensor


def spec(config: ConfigReader) -> ModelSpec:
    hidden = int(config.require("n_embd", "hidden_size"))
    heads = int(config.require("n_head", "num_attention_heads"))
    head_dim = hidden // heads
    return ModelSpec(
        model_type="gptj",
        num_layers=int(config.require("n_layer", "num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        vocab_size=int(config.require("vocab_size")),
        max_positions=int(config.get("n_positions", "max_position_embeddings", default=2048)),
        norm="layer",
        norm_eps=float(config.get("layer_norm_epsilon", default=1e-5)),
        residual="parallel",
        mlp="plain",
        activation=activation(config.get("activation_function", default="gelu_new")),
        intermediate_size=int(config.get("n_inner", default=4 * hidden)),
        mlp_bias=True,
        rotary=Rotary(dim=int(config.get("rotary_dim", default=head_dim)), interleaved=True),
        local=LocalSpec(tied_head=bool(config.get("tie_word_embeddings", default=False)), head_bias=True),
    )


def layer_sources(spec: ModelSpec, index: int, prefix: str) -> dict[str, Source]:
    attn = f"{prefix}attn."
    return {
        "attn_norm.weight": tensor(f"{prefix}ln_1.weight"),
        "attn_norm.bias": tensor(f"{prefix}ln_1.bias"),
        "qkv.weight": concat(f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
        "out.weight": tensor(f"{attn}out_proj.weight"),
        "up.weight": tensor(f"{prefix}mlp.fc_in.weight"),
        "up.bias": tensor(f"{prefix}mlp.fc_in.bias"),
        "down.weight": tensor(f"{prefix}mlp.fc_out.weight"),
        "down.bias": tensor(f"{prefix}mlp.fc_out.bias"),
    }


def local_sources(spec: ModelSpec) -> dict[str, Source]:
    return {
        "embed.weight": tensor("transformer.wte.weight"),
        "final_norm.weight": tensor("transformer.ln_f.weight"),
        "final_norm.bias": tensor("transformer.ln_f.bias"),
        "head.weight": tensor("transformer.wte.weight" if spec.local.tied_head else "lm_head.weight"),
        "head.bias": tensor("lm_head.bias"),
    }


FAMILY = Family(("gptj",), spec, "transformer.h.{i}.", layer_sources, local_sources)
