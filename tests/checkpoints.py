"""Tiny random checkpoints of each supported family, built the way users get them: config ->
model -> `save_pretrained` (safetensors, sharded when asked), with a real tokenizer beside them."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from swarm.default_model import default_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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
