"""What a span is, so a client never chains a peer that serves other weights under the same model name.

Two digests, both 128-bit BLAKE2b as 32 hex digits:

- `model_id`: the checkpoint's architecture, from `config.json` and every tensor's name, dtype and shape (shard
  headers only). Cheap for anyone holding the checkpoint folder; registries answer route queries by it.
- `weights` of a span: the bytes of each of its layers' tensors exactly as stored in the checkpoint. A node
  computes it while it reads them; a client computes the same from its own copy of the checkpoint (in a thread,
  once per layer, cached) and refuses peers whose digest differs.

Digests are of the checkpoint's bytes, not of what a node holds in memory, so they do not depend on the node's
dtype or quantization; those are announced beside them (`PeerInfo.dtype`, `quantization`). A node can lie about
its digest: catching a node whose outputs are wrong is span verification's job (`swarm.client.core.verify`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from swarm.checkpoint import CheckpointIndex, checkpoint_dir, read_tensors
from swarm.models import ModelArchitecture
from swarm.models.weights import stored_names

DIGEST_BYTES = 16


def _hasher() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=DIGEST_BYTES)


def model_id(model: str | Path, index: CheckpointIndex | None = None) -> str:
    """The checkpoint's architecture: its config and the name, dtype and shape of every tensor it stores."""
    root = checkpoint_dir(model)
    digest = _hasher()
    config = json.loads((root / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    index = index or CheckpointIndex.open(root)
    layout: list[tuple[str, str, list[int]]] = []
    for shard in sorted(set(index.shard_of.values())):
        with safe_open(str(root / shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - not a dict
                piece = handle.get_slice(name)
                layout.append((name, piece.get_dtype(), list(piece.get_shape())))
    digest.update(json.dumps(sorted(layout), separators=(",", ":")).encode())
    return digest.hexdigest()


class LayerDigest:
    """One layer's tensors as stored, added in any order (shards are read in their own order)."""

    def __init__(self) -> None:
        self._tensors: dict[str, bytes] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        digest = _hasher()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.detach().contiguous().view(torch.uint8).numpy()))
        self._tensors[name] = digest.digest()

    def digest(self) -> bytes:
        combined = _hasher()
        for name in sorted(self._tensors):
            combined.update(self._tensors[name])
        return combined.digest()


def span_digest(layer_digests: Sequence[bytes]) -> str:
    """The `weights` digest of consecutive layers, from their layer digests."""
    digest = _hasher()
    for layer in layer_digests:
        digest.update(layer)
    return digest.hexdigest()


class CheckpointDigests:
    """The expected `weights` of any span of a local checkpoint, each layer read and hashed once, when first
    needed (a client checks only the layers its peers serve)."""

    def __init__(self, model: str | Path, architecture: ModelArchitecture | None = None) -> None:
        self.root = checkpoint_dir(model)
        self.architecture = architecture or ModelArchitecture.of(self.root)
        self._index = CheckpointIndex.open(self.root)
        self.model_id = model_id(self.root, self._index)
        self._layers: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def span(self, start: int, end: int) -> str:
        """The digest a peer serving layers [start, end) of this checkpoint announces. Reads those layers' tensors
        the first time (blocking: call it off the event loop)."""
        with self._lock:
            for layer in range(start, end):
                if layer not in self._layers:
                    self._layers[layer] = self._read_layer(layer)
            return span_digest([self._layers[layer] for layer in range(start, end)])

    def known(self, start: int, end: int) -> str | None:
        """`span` when every layer in it was already hashed, else None (no I/O)."""
        with self._lock:
            if all(layer in self._layers for layer in range(start, end)):
                return span_digest([self._layers[layer] for layer in range(start, end)])
        return None

    def _read_layer(self, layer: int) -> bytes:
        digest = LayerDigest()
        sources = self.architecture.family.sources_of_layer(self.architecture.spec, layer)
        names = stored_names(self._index, sources)
        read_tensors(self._index, names, on_tensor=digest.add)
        return digest.digest()
