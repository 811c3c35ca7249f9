"""Memory estimates from checkpoint headers: what fits where."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from swarm.checkpoint import CheckpointIndex
from swarm.memory import ModelFootprint, format_bytes, parse_bytes
from swarm.models import ModelArchitecture


def test_sizes_parse_in_both_unit_systems() -> None:
    assert parse_bytes("6GiB") == 6 * 2**30 and parse_bytes("512MB") == 512_000_000 and parse_bytes("1024") == 1024
    assert parse_bytes("1.5 gib") == int(1.5 * 2**30)
    with pytest.raises(ValueError):
        parse_bytes("lots")
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(12) == "12 B"


def test_the_footprint_counts_every_parameter_once(tiny_llama) -> None:
    architecture = ModelArchitecture.of(tiny_llama)
    footprint = ModelFootprint.of(CheckpointIndex.open(tiny_llama), architecture)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert footprint.total_params == sum(p.numel() for p in model.parameters())
    assert footprint.layer_params[0] == sum(p.numel() for p in model.model.layers[0].parameters())
    assert architecture.spec.num_kv_heads == 2
    assert footprint.kv_bytes_per_token("float32") == 2 * 2 * 16 * 4  # K and V, 2 heads of 16, float32


def test_layers_that_fit_include_the_kv_cache(tiny_llama) -> None:
    footprint = ModelFootprint.of(CheckpointIndex.open(tiny_llama), ModelArchitecture.of(tiny_llama))
    per_layer = footprint.layer_bytes("float32") + 100 * footprint.kv_bytes_per_token("float32")
    assert footprint.layers_that_fit(3 * per_layer + 1, "float32", 100) == 3
    assert footprint.layers_that_fit(10**12, "float32", 100) == 8
    assert footprint.layers_that_fit(per_layer - 1, "float32", 100) == 0
    assert footprint.nodes_to_cover(3 * per_layer, "float32", 100) == 3
    assert footprint.layer_bytes("bfloat16") * 2 == footprint.layer_bytes("float32")
