"""Shared pieces of the benchmarks: random checkpoints, per-token timing, medians, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessor, PretrainedConfig

from swarm.models.families.llama import FAMILY as LLAMA_SHAPED

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # Petals' benchmark shape: a ~60M-parameter Llama, hidden 512, 8 layers
    "h512": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
    "250m": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
}


# What every family's config takes; the MLP width and KV heads stay Llama-shaped families' own.
SHARED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")

# Mixtures of experts: eight experts, two per token (Mixtral's own ratio), each as wide as the dense MLP.
EXPERTS: dict[str, dict[str, object]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}


def preset_config(preset: str, family: str = "llama") -> PretrainedConfig:
    """A config of `family` (a `model_type`) at a preset's size: Llama-shaped families take the preset whole,
    the others its vocabulary, width, depth and heads, with their own MLP ratio."""
    sizes: dict[str, object] = dict(PRESETS[preset])
    if family not in LLAMA_SHAPED.model_types:
        sizes = {key: sizes[key] for key in SHARED_SIZES}
    sizes |= EXPERTS.get(family, {})
    if family == "qwen3_moe":
        sizes["moe_intermediate_size"] = sizes["intermediate_size"]
    return AutoConfig.for_model(
        family, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **sizes
    )


THREADS_HELP = "torch threads of the local baseline and every process: default (as a user starts them) or a number"


def use_threads(option: str) -> int | None:
    """The thread count a `--threads` option asks for (None: torch's own choice), applied to this process;
    pass it on to `LocalSwarm(threads=...)` for the swarm's processes."""
    threads = None if option == "default" else int(option)
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


def build_random_llama(preset: str, target: Path | None = None) -> Path:
    """The benchmarks' default model (by default in the temporary folder, built once); `build_random_model` builds
    the other families."""
    target = target or Path(tempfile.gettempdir()) / "swarm-bench" / f"llama-{preset}"
    return build_random_model(preset, target)


def swarm_bench_setup(preset: str) -> tuple[Path, int, torch.Tensor]:
    """What the swarm benchmarks start from: the preset's random Llama, its number of layers, and a fixed prompt
    of 16 tokens."""
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    return build_random_llama(preset), PRESETS[preset]["num_hidden_layers"], prompt


def build_random_model(preset: str, target: Path, family: str = "llama") -> Path:
    """A random model of a preset size, saved sharded like real checkpoints (built once, then reused)."""
    if (target / "config.json").is_file():
        return target
    config = preset_config(preset, family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target, safe_serialization=True, max_shard_size="200MB")
    return target


class TokenClock(LogitsProcessor):
    """Timestamps every decoding step without changing the scores."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores

    def per_token_ms(self) -> list[float]:
        """Intervals between consecutive tokens: decode steps only, prefill excluded."""
        return [(b - a) * 1000 for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2))
