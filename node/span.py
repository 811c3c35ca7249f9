"""The layers a node hosts: read from only their own tensors, run with swarm's own decoder layers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from swarm.checkpoint import CheckpointIndex, tensor_nbytes
from swarm.models import ModelArchitecture
from swarm.models.adapters import LayerAdapters, LowRank, RowAdapter
from swarm.models.attention import StatelessAttention
from swarm.models.packed import pack_linears
from swarm.models.stack import LayerStack, layer_tensor_names
from swarm.node.kv_cache import CacheRows, KVCache, RoundAttention, RoundEntry
from swarm.node.threads import ThreadPlan, measure


@dataclass
class LoadedSpan:
    """Layers [start, end) of one model on one device, and the KV cache of their sessions."""

    architecture: ModelArchitecture
    stack: LayerStack
    cache: KVCache
    device: torch.device
    dtype: torch.dtype
    bytes_loaded: int = 0
    threads: ThreadPlan = field(default_factory=lambda: ThreadPlan(torch.get_num_threads()))
    """How many threads each round runs on (`plan_threads` measures it)."""

    @property
    def start(self) -> int:
        return self.stack.start

    @property
    def end(self) -> int:
        return self.stack.end

    @property
    def hidden_size(self) -> int:
        return self.architecture.hidden_size

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
        compile: bool = False,
    ) -> LoadedSpan:
        """Read layers [start, end) from the checkpoint with a progress bar.

        `quantize="int8"` stores the layers' linear weights as int8 (torchao, weight-only). `compile` has
        `torch.compile` fuse each layer; otherwise large float32 weights on a CPU are laid out for oneDNN
        (`swarm.models.packed`), which `torch.compile` cannot trace."""
        architecture = ModelArchitecture.of(model)
        if not 0 <= start < end <= architecture.num_layers:
            raise ValueError(f"layers {start}-{end - 1} are outside the model's 0-{architecture.num_layers - 1}")
        index = CheckpointIndex.open(model)
        total = tensor_nbytes(index, layer_tensor_names(index, architecture, start, end))
        loaded = 0
        with _progress(show_progress) as progress:
            task = progress.add_task(f"layers {start}-{end - 1}", total=total)

            def advance(name: str, tensor: torch.Tensor) -> None:
                nonlocal loaded
                loaded += tensor.numel() * tensor.element_size()
                progress.update(task, completed=loaded)

            stack = LayerStack.load(index, architecture, start, end, device, dtype, on_tensor=advance)
        if quantize is not None:
            quantize_linear_layers(stack.layers, quantize, device)
        if compile:
            stack.compile()
        else:
            pack_linears(stack.layers)
        cache = KVCache(architecture.spec, start, end, device, dtype)
        return cls(architecture, stack, cache, device, dtype, loaded)

    @property
    def weight_bytes(self) -> int:
        """Memory the layers' parameters and buffers take, int8 weights and their scales included."""
        tensors = [*self.stack.parameters(), *self.stack.buffers()]
        return sum(tensor_storage_bytes(tensor) for tensor in tensors)

    @torch.inference_mode()
    def run_round(
        self,
        hidden: torch.Tensor,
        entries: list[RoundEntry],
        start: int,
        end: int,
        adapters: list[RowAdapter] | None = None,
    ) -> torch.Tensor:
        """Layers [start, end) over the new tokens of one or more sessions (their rows stacked in `hidden`, in
        the order of `entries`, each row range with its session's adapter if it has one), reading and extending
        their caches; returns the span's dtype."""
        with self.threads.applied(hidden.shape[0] * hidden.shape[1]):
            return self._round(hidden, entries, start, end, adapters)

    def _round(
        self,
        hidden: torch.Tensor,
        entries: list[RoundEntry],
        start: int,
        end: int,
        adapters: list[RowAdapter] | None = None,
    ) -> torch.Tensor:
        positions = torch.cat([entry.positions for entry in entries]) if len(entries) > 1 else entries[0].positions
        attention = RoundAttention(self.cache, entries)
        hidden = hidden.to(self.device, self.dtype)
        return self.stack(hidden, positions.to(self.device), attention, start, end, adapters)

    @torch.inference_mode()
    def forward_stateless(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        padding: torch.Tensor,
        start: int,
        end: int,
        adapter: LayerAdapters | None = None,
    ) -> torch.Tensor:
        """Layers [start, end) over a whole sequence with no session: nothing is kept."""
        hidden = hidden.to(self.device, self.dtype)
        attention = StatelessAttention(self.architecture.spec, padding.to(self.device), positions, hidden.dtype)
        rows = [RowAdapter(0, hidden.shape[0], adapter)] if adapter is not None else None
        with self.threads.applied(hidden.shape[0] * hidden.shape[1]):
            return self.stack(hidden, positions.to(self.device), attention, start, end, rows)

    def backward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        padding: torch.Tensor | None,
        grad_output: torch.Tensor,
        start: int,
        end: int,
        adapter: LayerAdapters | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Gradients of sum(forward(hidden) * grad_output) over layers [start, end) with no session, with respect
        to `hidden` and to the adapter's tensors (in `LayerAdapters.tensors` order). The layers run again with
        each one's activations recomputed during the backward pass (`LayerStack.forward`'s `recompute`), so a
        backward holds one layer's activations, not the span's."""
        with torch.enable_grad():
            inputs = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            leaves: list[torch.Tensor] = []
            rows: list[RowAdapter] = []
            if adapter is not None:
                pairs = {
                    key: LowRank(
                        pair.a.to(self.device, self.dtype).requires_grad_(True),
                        pair.b.to(self.device, self.dtype).requires_grad_(True),
                    )
                    for key, pair in adapter.pairs.items()
                }
                adapter = LayerAdapters(adapter.scale, pairs)
                leaves = adapter.tensors()
                rows = [RowAdapter(0, inputs.shape[0], adapter)]
            real = padding if padding is not None else torch.ones(inputs.shape[:2], dtype=torch.bool)
            attention = StatelessAttention(self.architecture.spec, real.to(self.device), positions, inputs.dtype)
            output = self.stack(inputs, positions.to(self.device), attention, start, end, rows, recompute=True)
            grads = torch.autograd.grad(output, [inputs, *leaves], grad_output.to(self.device, output.dtype))
        return grads[0], list(grads[1:])

    @contextmanager
    def _scratch_rows(self, max_length: int) -> Iterator[CacheRows]:
        """One row of cache to measure with, given back afterwards."""
        rows = self.cache.allocate(1, max_length)
        try:
            yield rows
        finally:
            self.cache.release(rows)

    def plan_threads(self) -> ThreadPlan:
        """Measure which rounds run faster on one thread than on all of them (`swarm.node.threads`), and keep
        that plan. On a GPU the threads only launch kernels: every round keeps them all."""
        threads = torch.get_num_threads()
        self.threads = ThreadPlan(threads) if self.device.type != "cpu" else measure(self._time_round, threads)
        return self.threads

    def _time_round(self, tokens: int) -> float:
        """Seconds of one round of `tokens` new tokens of one row, through every layer, on a scratch session."""
        with self._scratch_rows(tokens) as rows, torch.inference_mode():
            entry = RoundEntry(rows, 0, torch.arange(tokens)[None], None)
            hidden = torch.zeros(1, tokens, self.hidden_size)
            began = time.perf_counter()
            self._round(hidden, [entry], self.start, self.end)  # on the caller's thread count
            return time.perf_counter() - began

    def measure_throughput(self, repeats: int = 5) -> float:
        """Decode steps per second through one layer, from a few single-token steps of a scratch session."""
        hidden = torch.zeros(1, 1, self.hidden_size)
        timings = []
        with self._scratch_rows(repeats + 1) as rows:
            for step in range(repeats + 1):
                entry = RoundEntry(rows, step, torch.tensor([[step]]), torch.ones(1, 1, dtype=torch.bool))
                began = time.perf_counter()
                self.run_round(hidden, [entry], self.start, self.end)
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


def quantize_linear_layers(layers: nn.Module, scheme: str, device: torch.device) -> None:
    """Weight-only int8 for every `nn.Linear`, with torchao (`Int8WeightOnlyConfig`): int8 weights with one
    scale per output channel, activations and compute stay in the span's dtype; the same on CPU and GPU."""
    if scheme != "int8":
        raise ValueError(f"unknown quantization {scheme!r}; supported: int8")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ValueError("--quantize int8 needs torchao: pip install torchao") from exc
    quantize_(layers, Int8WeightOnlyConfig(), device=device)


def tensor_storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes behind a tensor; a quantized tensor subclass (torchao) counts the tensors it is made of."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
