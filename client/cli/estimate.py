"""`swarm-client estimate PATH`: what a model costs to host, before anyone loads it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from swarm.checkpoint import CheckpointIndex
from swarm.client.core.settings import ClientSettings
from swarm.default_model import default_model_path
from swarm.memory import DTYPE_BYTES, ModelFootprint, format_bytes, parse_bytes
from swarm.models import ModelArchitecture


def estimate(model: Path, memory: int, cache_tokens: int) -> dict[str, object]:
    """Parameters, bytes per dtype, per-layer size, KV bytes per token, and nodes of `memory` needed."""
    footprint = ModelFootprint.of(CheckpointIndex.open(model), ModelArchitecture.of(model))
    per_dtype = {}
    for dtype, width in DTYPE_BYTES.items():
        per_dtype[dtype] = {
            "total_bytes": footprint.total_params * width,
            "layer_bytes": footprint.layer_bytes(dtype),
            "client_bytes": footprint.local_params * width,
            "kv_bytes_per_token_per_layer": footprint.kv_bytes_per_token(dtype),
            "kv_bytes_per_token": footprint.kv_bytes_per_token(dtype) * footprint.num_layers,
            "layers_per_node": footprint.layers_that_fit(memory, dtype, cache_tokens),
            "nodes_to_cover": footprint.nodes_to_cover(memory, dtype, cache_tokens),
        }
    return {
        "model": str(model),
        "num_layers": footprint.num_layers,
        "parameters": footprint.total_params,
        "layer_parameters": max(footprint.layer_params),
        "client_parameters": footprint.local_params,
        "node_memory": memory,
        "cache_tokens": cache_tokens,
        "dtypes": per_dtype,
    }


def render_estimate(report: dict[str, object], console: Console) -> None:
    console.print(
        f"[bold]{report['model']}[/bold]: {report['parameters']:,} parameters, {report['num_layers']} layers of "
        f"{report['layer_parameters']:,}; the client holds {report['client_parameters']:,} (embeddings, norm, head)"
    )
    table = Table(
        "dtype",
        "weights",
        "per layer",
        "client",
        "KV / token (all layers)",
        f"layers per {format_bytes(report['node_memory'])} node",
        "nodes to cover",
        box=None,
    )
    for dtype, row in report["dtypes"].items():  # type: ignore[union-attr]
        table.add_row(
            dtype,
            format_bytes(row["total_bytes"]),
            format_bytes(row["layer_bytes"]),
            format_bytes(row["client_bytes"]),
            format_bytes(row["kv_bytes_per_token"]),
            str(row["layers_per_node"]),
            str(row["nodes_to_cover"] or "-"),
        )
    console.print(table)
    console.print(
        f"(each node also keeps a KV cache of {report['cache_tokens']} tokens for its layers; int8 weights "
        "compute and cache in float32)"
    )


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    report = estimate(
        Path(settings.model) if settings.model else default_model_path(), parse_bytes(args.memory), args.cache_tokens
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render_estimate(report, Console())
    return 0
