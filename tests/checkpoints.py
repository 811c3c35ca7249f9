"""Tiny random checkpoints of each supported family, built the way users get them: config ->
model -> `save_pretrained` (safetensors, sharded when asked), with a real tokenizer beside them where a test
decodes text."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from swarm.default_model import default_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_LLAMA_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
_FALCON_SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)

# Every family and layout the adapters cover, 4 layers each. Initialized wider than the default (0.02) so that
# greedy tokens vary and logits are large enough for a 1e-4 tolerance to mean something; no EOS, so every
# generation runs its full length.
TINY_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, object]]] = {
    "llama": (LlamaConfig, _LLAMA_SHAPE),
    "mistral": (MistralConfig, dict(_LLAMA_SHAPE, sliding_window=4096)),
    "qwen2": (Qwen2Config, dict(_LLAMA_SHAPE, tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, dict(_LLAMA_SHAPE, head_dim=32)),
    "mixtral": (MixtralConfig, dict(_LLAMA_SHAPE, num_local_experts=4, num_experts_per_tok=2)),
    # a dense layer (mlp_only_layers) among sparse ones, four experts of which two per token, not renormalized
    "qwen3_moe": (
        Qwen3MoeConfig,
        dict(
            _LLAMA_SHAPE,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    "gpt_neox": (
        GPTNeoXConfig,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, rotary_pct=0.25),
    ),
    "gptj": (GPTJConfig, dict(n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=256)),
    "opt": (OPTConfig, dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4)),
    # opt-350m's layout: embeddings projected in and out of the layers' width, no final layer norm.
    "opt-projected": (
        OPTConfig,
        dict(
            hidden_size=64,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
    ),
    "bloom": (BloomConfig, dict(hidden_size=48, n_layer=4, n_head=6)),
    "falcon-rotary": (FalconConfig, dict(_FALCON_SHAPE, multi_query=True, parallel_attn=True)),
    "falcon-alibi": (FalconConfig, dict(_FALCON_SHAPE, alibi=True, multi_query=False, parallel_attn=False, bias=True)),
    "falcon-new": (FalconConfig, dict(_FALCON_SHAPE, new_decoder_architecture=True, num_kv_heads=2)),
    "gpt2": (GPT2Config, dict(n_embd=64, n_layer=4, n_head=4, n_positions=256)),
}


def tiny_config(family: str, vocab_size: int = 512) -> PretrainedConfig:
    """A 4-layer random config of `family`, a key of `TINY_CONFIGS`."""
    config_class, values = TINY_CONFIGS[family]
    return config_class(
        vocab_size=vocab_size, initializer_range=0.2, bos_token_id=1, eos_token_id=None, pad_token_id=0, **values
    )


def build_tiny(family: str, target: Path, sharded: bool = True) -> Path:
    """A tiny random checkpoint of `family` in `target`, sharded into several safetensors files by default."""
    return save_checkpoint(tiny_config(family), target, max_shard_size="100KB" if sharded else None)


def copy_tokenizer(target: Path) -> int:
    """Put the embedded model's tokenizer beside a test checkpoint; returns its vocabulary size."""
    from transformers import AutoTokenizer

    source = default_model_path()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    return len(AutoTokenizer.from_pretrained(target))


def tiny_llama_config(vocab_size: int, **overrides: object) -> LlamaConfig:
    values: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_checkpoint(config: PretrainedConfig, target: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """A random model of `config`, float32, saved as safetensors (sharded if `max_shard_size`)."""
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(target, safe_serialization=True, **kwargs)
    return target


def build_tiny_llama(target: Path, sharded: bool = True, **overrides: object) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    vocab_size = copy_tokenizer(target)
    config = tiny_llama_config(vocab_size, **overrides)
    return save_checkpoint(config, target, max_shard_size="200KB" if sharded else None)
