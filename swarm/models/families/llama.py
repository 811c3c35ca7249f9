"""Llama and the families with its layer: Mistral, Qwen2, Qwen3 (qk-norm), and the mixtures of experts
Mixtral and Qwen3-MoE. RMSNorm, rotary over whole heads, grouped-query attention, gated SiLU MLP."""

from __future__ import annotations

from swarm.errors import UnsupportedModelError
from swarm.models.families import Family
from swarm.models.spec import ConfigReader, LocalSpec, ModelSpec, MoE, activation
from swarm.models.weights import Source, concat, stacked, tensor

MOE_TYPES = ("mixtral", "qwen3_moe")


def spec(config: ConfigReader) -> ModelSpec:
    model_type = config.model_type
    hidden = int(config.require("hidden_size"))
    heads = int(config.require("num_attention_heads"))
    head_dim = int(config.get("head_dim", default=hidden // heads))
    attention_bias = bool(config.get("attention_bias", default=False))
    return ModelSpec(
        model_type=model_type,
        num_layers=int(config.require("num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads", default=heads)),
        head_dim=head_dim,
        vocab_size=int(config.require("vocab_size")),
        max_positions=int(config.get("max_position_embeddings", default=4096)),
        norm="rms",
        norm_eps=float(config.get("rms_norm_eps", default=1e-6)),
        norm_bias=False,
        residual="sequential",
        mlp="gated",
        activation=activation(config.get("hidden_act", default="silu")),
        intermediate_size=int(config.require("intermediate_size")),
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(config.get("mlp_bias", default=False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        rotary=config.rotary(head_dim),
        sliding_window=_sliding_window(config),
        moe=_moe(config),
        local=LocalSpec(tied_head=bool(config.get("tie_word_embeddings", default=False))),
    )


def _sliding_window(config: ConfigReader) -> int | None:
    """Mistral and Mixtral window every layer; Qwen2/3 only with `use_sliding_window`, in some layers."""
    window = config.get("sliding_window")
    if config.model_type in ("mistral", "mixtral"):
        return int(window) if window else None
    if not config.get("use_sliding_window", default=False) or not window:
        return None
    layer_types = config.get("layer_types") or []
    if layer_types and all(kind == "sliding_attention" for kind in layer_types):
        return int(window)
    raise UnsupportedModelError(f"{config.model_type} with sliding windows in only some layers is not supported")


def _moe(config: ConfigReader) -> MoE | None:
    if config.model_type == "mixtral":
        return MoE(
            experts=int(config.require("num_local_experts")),
            top_k=int(config.require("num_experts_per_tok")),
            intermediate_size=int(config.require("intermediate_size")),
            normalize=True,
            weights_in_input_dtype=False,
        )
    experts = int(config.get("num_experts", "num_local_experts", default=0))  # transformers 5.24 renamed it
    if config.model_type == "qwen3_moe" and experts > 0:
        layers = int(config.require("num_hidden_layers"))
        step = int(config.get("decoder_sparse_step", default=1))
        dense = set(config.get("mlp_only_layers", default=[])) | {i for i in range(layers) if (i + 1) % step}
        return MoE(
            experts=experts,
            top_k=int(config.require("num_experts_per_tok")),
            intermediate_size=int(config.require("moe_intermediate_size")),
            normalize=bool(config.get("norm_topk_prob", default=False)),
            dense_layers=frozenset(dense),
        )
    return None


def layer_sources(spec: ModelSpec, index: int, prefix: str) -> dict[str, Source]:
    attn, mlp = f"{prefix}self_attn.", f"{prefix}mlp."
    sources = {
        "attn_norm.weight": tensor(f"{prefix}input_layernorm.weight"),
        "mlp_norm.weight": tensor(f"{prefix}post_attention_layernorm.weight"),
        "qkv.weight": concat(f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
        "out.weight": tensor(f"{attn}o_proj.weight"),
    }
    if spec.qkv_bias:
        sources["qkv.bias"] = concat(f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias")
    if spec.out_bias:
        sources["out.bias"] = tensor(f"{attn}o_proj.bias")
    if spec.qk_norm:
        sources["q_norm.weight"] = tensor(f"{attn}q_norm.weight")
        sources["k_norm.weight"] = tensor(f"{attn}k_norm.weight")
    if spec.moe is not None and spec.layer_has_moe(index):
        return sources | _expert_sources(spec, spec.moe, prefix)
    sources["gate_up.weight"] = concat(f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight")
    sources["down.weight"] = tensor(f"{mlp}down_proj.weight")
    if spec.mlp_bias:
        sources["gate_up.bias"] = concat(f"{mlp}gate_proj.bias", f"{mlp}up_proj.bias")
        sources["down.bias"] = tensor(f"{mlp}down_proj.bias")
    return sources


def _expert_sources(spec: ModelSpec, moe_spec: MoE, prefix: str) -> dict[str, Source]:
    """Experts as published: Mixtral's `block_sparse_moe.experts.E.w1/w3/w2` (gate, up, down), Qwen3-MoE's
    `mlp.experts.E.gate_proj/up_proj/down_proj`."""
    experts = range(moe_spec.experts)
    if spec.model_type == "mixtral":
        moe = f"{prefix}block_sparse_moe."
        gate_up = [(f"{moe}experts.{e}.w1.weight", f"{moe}experts.{e}.w3.weight") for e in experts]
        down = [(f"{moe}experts.{e}.w2.weight",) for e in experts]
    else:
        moe = f"{prefix}mlp."
        gate_up = [(f"{moe}experts.{e}.gate_proj.weight", f"{moe}experts.{e}.up_proj.weight") for e in experts]
        down = [(f"{moe}experts.{e}.down_proj.weight",) for e in experts]
    return {
        "router.weight": tensor(f"{moe}gate.weight"),
        "experts.gate_up": stacked(gate_up, per_item=2),
        "experts.down": stacked(down, per_item=1),
    }


def local_sources(spec: ModelSpec) -> dict[str, Source]:
    head = "model.embed_tokens.weight" if spec.local.tied_head else "lm_head.weight"
    return {
        "embed.weight": tensor("model.embed_tokens.weight"),
        "final_norm.weight": tensor("model.norm.weight"),
        "head.weight": tensor(head),
    }


FAMILY = Family(
    model_types=("llama", "mistral", "qwen2", "qwen3", *MOE_TYPES),
    spec=spec,
    layer_prefix="model.layers.{i}.",
    layer_sources=layer_sources,
    local_sources=local_sources,
)
