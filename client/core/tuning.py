"""What a client learns through the swarm and runs with: a soft prompt, a low-rank adapter, or both.

A soft prompt is a few learned vectors in the token-embedding space, put in front of every sequence (prompt
tuning): the swarm's layers see them as tokens, and only the client knows them. A low-rank adapter (LoRA) adds
`alpha / rank * B A x` to chosen attention projections of chosen layers; the client sends each peer the pairs of
the layers it serves, with a session (`OpenSession.adapter`) or a pass (`Forward.adapter`, `Backward.adapter`),
and the peer applies them to that session's rows only.

Both live in a `Tuning`, an `nn.Module` whose parameters a torch optimizer trains (`swarm-client tune`), saved
as one safetensors file that `generate`, `score` and the gateway load by path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from swarm.models.adapters import TARGETS, target_shape
from swarm.models.spec import ModelSpec
from swarm.protocol import AdapterPair, WireAdapter, WireTensor

FORMAT = "swarm-tuning"
FORMAT_VERSION = "1"


class SoftPrompt(nn.Module):
    """`tokens` learned embeddings put before every sequence, [tokens, embedding size]."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone().float())

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[0]


class LowRankAdapter(nn.Module):
    """LoRA pairs for `targets` of `layers`: A starts random and B at zero, so an untrained adapter changes
    nothing (as in the LoRA paper)."""

    def __init__(
        self,
        spec: ModelSpec,
        rank: int,
        alpha: float | None = None,
        layers: list[int] | None = None,
        targets: tuple[str, ...] = TARGETS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        unknown = set(targets) - set(TARGETS)
        if rank < 1 or unknown or not targets:
            raise ValueError(f"an adapter needs a rank >= 1 and targets among {TARGETS}, got {rank}, {targets}")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.layers = sorted(layers if layers is not None else range(spec.num_layers))
        self.targets = tuple(targets)
        self.pairs = nn.ParameterDict()
        for layer in self.layers:
            for target in self.targets:
                features_in, features_out = target_shape(spec, target)
                bound = 1 / math.sqrt(features_in)
                a = (torch.rand(rank, features_in, generator=generator) * 2 - 1) * bound
                self.pairs[_key(layer, target, "a")] = nn.Parameter(a)
                self.pairs[_key(layer, target, "b")] = nn.Parameter(torch.zeros(features_out, rank))

    def pairs_in(self, start: int, end: int) -> list[tuple[int, str, nn.Parameter, nn.Parameter]]:
        """(layer, target, A, B) of the layers in [start, end), in layer then target order."""
        return [
            (layer, target, self.pairs[_key(layer, target, "a")], self.pairs[_key(layer, target, "b")])
            for layer in self.layers
            if start <= layer < end
            for target in self.targets
        ]

    def wire(self, start: int, end: int) -> WireAdapter | None:
        """The pairs of layers [start, end) as a peer receives them (None when none of them is adapted)."""
        pairs = [
            AdapterPair(
                layer=layer, target=target, a=WireTensor.from_torch(a.detach()), b=WireTensor.from_torch(b.detach())
            )
            for layer, target, a, b in self.pairs_in(start, end)
        ]
        return WireAdapter(rank=self.rank, alpha=self.alpha, pairs=pairs) if pairs else None


def _key(layer: int, target: str, part: str) -> str:
    return f"{layer}_{target}_{part}"


class Tuning(nn.Module):
    """A soft prompt, an adapter, or both, for one model (`model_name`)."""

    def __init__(
        self,
        model_name: str,
        soft_prompt: SoftPrompt | None = None,
        adapter: LowRankAdapter | None = None,
    ) -> None:
        super().__init__()
        if soft_prompt is None and adapter is None:
            raise ValueError("a tuning holds a soft prompt, an adapter, or both")
        self.model_name = model_name
        self.soft_prompt = soft_prompt
        self.adapter = adapter

    def describe(self) -> str:
        parts = []
        if self.soft_prompt is not None:
            parts.append(f"a soft prompt of {self.soft_prompt.tokens} tokens")
        if self.adapter is not None:
            layers = self.adapter.layers
            parts.append(
                f"a rank-{self.adapter.rank} adapter on {', '.join(self.adapter.targets)} of "
                f"{len(layers)} layer{'s' if len(layers) != 1 else ''}"
            )
        return " and ".join(parts)

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> None:
        """One safetensors file: the tensors, and in its metadata what they are (and `extra`, e.g. a training
        run's state)."""
        tensors: dict[str, torch.Tensor] = {}
        metadata = {"format": FORMAT, "version": FORMAT_VERSION, "model": self.model_name, **(extra or {})}
        if self.soft_prompt is not None:
            tensors["soft_prompt"] = self.soft_prompt.embeddings.detach().contiguous()
        if self.adapter is not None:
            for name, value in self.adapter.pairs.items():
                tensors[f"adapter.{name}"] = value.detach().contiguous()
            metadata["adapter"] = json.dumps(
                {
                    "rank": self.adapter.rank,
                    "alpha": self.adapter.alpha,
                    "layers": self.adapter.layers,
                    "targets": list(self.adapter.targets),
                }
            )
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, spec: ModelSpec) -> Tuning:
        """A file `save` wrote, checked against the model it is loaded for."""
        tensors, metadata = read_tuning_file(path)
        soft_prompt = None
        if "soft_prompt" in tensors:
            embeddings = tensors["soft_prompt"]
            if embeddings.ndim != 2:
                raise ValueError(
                    f"{path}: the soft prompt must be [tokens, embedding size], got {list(embeddings.shape)}"
                )
            soft_prompt = SoftPrompt(embeddings)
        adapter = None
        if "adapter" in metadata:
            described = json.loads(metadata["adapter"])
            adapter = LowRankAdapter(
                spec, described["rank"], described["alpha"], described["layers"], tuple(described["targets"])
            )
            for name, parameter in adapter.pairs.items():
                stored = tensors.get(f"adapter.{name}")
                if stored is None or stored.shape != parameter.shape:
                    raise ValueError(
                        f"{path}: adapter tensor {name} is missing or of the wrong shape for this model "
                        f"(expected {list(parameter.shape)})"
                    )
                parameter.data.copy_(stored)
        return cls(metadata.get("model", ""), soft_prompt, adapter)


def read_tuning_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tuning file at {path} (write one with `swarm-client tune`)")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a swarm tuning file (written by `swarm-client tune`)")
    return load_file(str(path)), metadata
