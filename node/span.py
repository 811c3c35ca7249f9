"""The layers a node hosts: loaded from only their own tensors, run under `torch.inference_mode`."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from transformers import DynamicCache

from swarm.checkpoint import CheckpointIndex, load_config, tensor_nbytes
from swarm.models import ModelAdapter, adapter_for
from swarm.models.loading import checkpoint_aliases, load_modules, module_tensor_names


@dataclass
class LoadedSpan:
    """Layers [start, end) of one model on one device."""

    adapter: ModelAdapter
    start: int
    end: int
    layers: nn.ModuleList
    extras: nn.ModuleDict
    device: torch.device
    dtype: torch.dtype
    bytes_loaded: int = 0

    @classmethod
    def load(
        cls,
        model: str | Path,
        start: int,
        end: int,
        device: torch.device,
        dtype: torch.dtype,
        show_progress: bool = True,
        quantize: str | None = None,
    ) -> LoadedSpan:
        """Build layers [start, end) empty, then fill them from the checkpoint with a progress bar.

        `quantize="int8"` stores the layers' linear weights as int8 (torchao, weight-only)."""
        adapter = adapter_for(load_config(model))
        if not 0 <= start < end <= adapter.num_layers:
            raise ValueError(f"layers {start}-{end - 1} are outside the model's 0-{adapter.num_layers - 1}")
        index = CheckpointIndex.open(model)
        skeleton = adapter.skeleton()
        wanted = {
            str(i): (skeleton.get_submodule(adapter.layer_prefix(i).rstrip(".")), adapter.layer_prefix(i))
            for i in range(start, end)
        }
        aliases = checkpoint_aliases(skeleton, index)
        names = [n for m, p in wanted.values() for n in module_tensor_names(m, p)]
        total = tensor_nbytes(index, [aliases.get(n, n) for n in names])
        loaded = 0
        with _progress(show_progress) as progress:
            task = progress.add_task(f"layers {start}-{end - 1}", total=total)

            def advance(name: str, tensor: torch.Tensor) -> None:
                nonlocal loaded
                loaded += tensor.numel() * tensor.element_size()
                progress.update(task, completed=loaded)

            modules = load_modules(index, wanted, device, dtype, on_tensor=advance, aliases=aliases)
        layers = nn.ModuleList(modules[str(i)] for i in range(start, end))
        adapter.restore_buffers(layers, device)
        if quantize is not None:
            layers = quantize_linear_layers(layers, quantize, device, dtype)
        return cls(adapter, start, end, layers, adapter.build_span_extras(skeleton, device), device, dtype, loaded)

    @property
    def weight_bytes(self) -> int:
        """Memory the layers' parameters and buffers take, int8 weights and their scales included."""
        tensors = [*self.layers.parameters(), *self.layers.buffers()]
        return sum(tensor_storage_bytes(tensor) for tensor in tensors)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.adapter.config)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache | None,
        start: int,
        end: int,
    ) -> torch.Tensor:
        """Layers [start, end) (a sub-range of the span) over new positions; returns the span's dtype."""
        hidden = hidden.to(self.device, self.dtype)
        layers = list(self.layers)[start - self.start : end - self.start]  # slicing a ModuleList builds a module
        return self.adapter.run_span(
            layers,
            self.extras,
            hidden,
            position_ids.to(self.device),
            attention_mask.to(self.device),
            cache,
            start,
        )

    def measure_throughput(self, repeats: int = 5) -> float:
        """Decode steps per second through one layer, from a few single-token steps."""
        cache = self.new_cache()
        hidden = torch.zeros(1, 1, self.adapter.hidden_size)
        timings = []
        for step in range(repeats + 1):
            positions = torch.tensor([[step]])
            mask = torch.ones(1, step + 1, dtype=torch.bool)
            began = time.perf_counter()
            self.forward(hidden, positions, mask, cache, self.start, self.end)
            timings.append(time.perf_counter() - began)
        per_layer = statistics.median(timings[1:]) / (self.end - self.start)
        return 1.0 / max(per_layer, 1e-9)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]loading[/bold] {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def quantize_linear_layers(
    layers: nn.ModuleList, scheme: str, device: torch.device, dtype: torch.dtype
) -> nn.ModuleList:
    """Weight-only int8 for every `nn.Linear`, with torchao (`Int8WeightOnlyConfig`): int8 weights with one
    scale per output channel, activations and compute stay in `dtype`; the same on CPU and GPU."""
    if scheme != "int8":
        raise ValueError(f"unknown quantization {scheme!r}; supported: int8")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ValueError("--quantize int8 needs torchao: pip install torchao") from exc
    quantize_(layers, Int8WeightOnlyConfig(), device=device)
    return layers


def tensor_storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes behind a tensor; a quantized tensor subclass (torchao) counts the tensors it is made of."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
