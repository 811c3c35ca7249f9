"""Training through the swarm: seconds per optimizer step through 2 nodes against the same step locally, and what a
backward costs the nodes in memory against forward passes alone.

One step = forward, loss on every token, backward, AdamW, for a batch of `--batch` random sequences of `--tokens`
tokens. The local baseline is transformers in this process with the same trainable parameters (a soft prompt as
input embeddings; an adapter as hooks adding B A x to q, k, v and o); local and swarm steps alternate, each swarm
step compared with the local one just before it (a shared machine's speed drifts over seconds). Node memory is
each node process's peak resident set (VmHWM) above its idle size: first after `--repeats` forward-only passes of
the same batch, then after the training steps.

    python bench/train.py --preset tiny
    python bench/train.py --preset 250m --repeats 5
    python bench/train.py --preset tiny --tuning lora --threads 1
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository first, not bench/ (see bench/__init__.py)

from swarm.runtime import quiet_optional_backends

quiet_optional_backends()  # before transformers imports torchao, which logs what this machine cannot load

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, PreTrainedModel

from bench.common import PRESETS, THREADS_HELP, build_random_llama, median, use_threads, write_json
from bench.load import peak_rss_bytes
from swarm.client import DistributedModelForCausalLM
from swarm.client.core.tuning import LowRankAdapter, SoftPrompt, Tuning
from swarm.client.local_swarm import LocalSwarm


def make_tuning(kind: str, model: DistributedModelForCausalLM) -> Tuning:
    generator = torch.Generator().manual_seed(0)
    if kind == "soft-prompt":
        width = model.local.embed.weight.shape[1]
        return Tuning(model.planner.model_name, SoftPrompt(torch.randn(8, width, generator=generator) * 0.02))
    lora = LowRankAdapter(model.architecture.spec, 8, generator=generator)
    return Tuning(model.planner.model_name, adapter=lora)


class LocalStep:
    """The same training step in one process, with transformers: what the swarm step is compared against."""

    def __init__(self, model: PreTrainedModel, tuning: Tuning) -> None:
        self.model = model
        self.tuning = tuning
        if tuning.adapter is not None:
            self._hook_adapter(tuning.adapter)
        self.optimizer = torch.optim.AdamW(tuning.parameters(), lr=1e-3)

    def _hook_adapter(self, adapter: LowRankAdapter) -> None:
        config = self.model.config
        head_dim = config.hidden_size // config.num_attention_heads
        sizes = [config.num_attention_heads * head_dim, *[config.num_key_value_heads * head_dim] * 2]
        scale = adapter.alpha / adapter.rank
        for layer, target, a, b in adapter.pairs_in(0, config.num_hidden_layers):
            attention = self.model.model.layers[layer].self_attn
            if target == "out":
                attention.o_proj.register_forward_hook(_lora_hook(a, b, scale))
                continue
            first = 0
            for projection, size in zip((attention.q_proj, attention.k_proj, attention.v_proj), sizes, strict=True):
                projection.register_forward_hook(_lora_hook(a, b, scale, slice(first, first + size)))
                first += size

    def __call__(self, ids: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        embeds = self.model.get_input_embeddings()(ids)
        prompt = self.tuning.soft_prompt
        if prompt is not None:
            embeds = torch.cat([prompt.embeddings[None].expand(ids.shape[0], -1, -1), embeds], dim=1)
        logits = self.model(inputs_embeds=embeds).logits[:, -ids.shape[1] :]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scale: float, rows: slice = slice(None)):
    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + (inputs[0] @ a.T) @ (b[rows].T * scale)

    return hook


def swarm_step(model: DistributedModelForCausalLM, tuning: Tuning, optimizer: torch.optim.Optimizer, ids) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, tuning=tuning).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--tuning", choices=["soft-prompt", "lora"], default="soft-prompt")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="training steps measured (after one warm-up)")
    parser.add_argument("--threads", default="default", help=THREADS_HELP)
    parser.add_argument("--json", type=Path, help="where to write results (default bench/results/train-PRESET.json)")
    args = parser.parse_args()
    threads = use_threads(args.threads)
    checkpoint = build_random_llama(args.preset)
    layers = PRESETS[args.preset]["num_hidden_layers"]
    ids = torch.randint(3, 1000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    local_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for parameter in local_model.parameters():
        parameter.requires_grad_(False)

    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir), threads=threads) as swarm:
        swarm.start_registry()
        half = layers // 2
        nodes = [swarm.start_node(checkpoint, f"0-{half - 1}"), swarm.start_node(checkpoint, f"{half}-{layers - 1}")]
        swarm.wait_ready(checkpoint.name)
        model = DistributedModelForCausalLM.from_pretrained(checkpoint, registry=swarm.registry_url, verify_rate=0)
        try:
            idle = [peak_rss_bytes(node.popen.pid) for node in nodes]
            with torch.no_grad():
                for _ in range(args.repeats):
                    model(input_ids=ids)
            forward_peak = [peak_rss_bytes(node.popen.pid) for node in nodes]

            tuning = make_tuning(args.tuning, model)
            local = LocalStep(local_model, make_tuning(args.tuning, model))
            optimizer = torch.optim.AdamW(tuning.parameters(), lr=1e-3)
            local(ids)
            swarm_step(model, tuning, optimizer, ids)  # warm-up: connections, first allocations
            local_seconds, swarm_seconds, ratios = [], [], []
            for _ in range(args.repeats):
                began = time.perf_counter()
                local(ids)
                local_seconds.append(time.perf_counter() - began)
                began = time.perf_counter()
                swarm_step(model, tuning, optimizer, ids)
                swarm_seconds.append(time.perf_counter() - began)
                ratios.append(swarm_seconds[-1] / local_seconds[-1])
            backward_peak = [peak_rss_bytes(node.popen.pid) for node in nodes]
        finally:
            model.close()

    mib = 2**20
    results = {
        "preset": args.preset,
        "tuning": args.tuning,
        "batch": args.batch,
        "tokens": args.tokens,
        "threads": args.threads,
        "local_step_seconds": median(local_seconds),
        "swarm_step_seconds": median(swarm_seconds),
        "swarm_over_local": median(ratios),
        "nodes": [
            {
                "layers": node.args[node.args.index("--layers") + 1],
                "idle_mib": idle[i] / mib,
                "forward_peak_above_idle_mib": (forward_peak[i] - idle[i]) / mib,
                "training_peak_above_idle_mib": (backward_peak[i] - idle[i]) / mib,
            }
            for i, node in enumerate(nodes)
        ],
    }
    table = Table(title=f"training step, {args.tuning}, {args.preset}, batch {args.batch} x {args.tokens} tokens")
    for column in ("", "local", "swarm (2 nodes)", "swarm / local"):
        table.add_column(column)
    table.add_row(
        "seconds per step (median)",
        f"{results['local_step_seconds']:.3f}",
        f"{results['swarm_step_seconds']:.3f}",
        f"{results['swarm_over_local']:.2f}",
    )
    Console().print(table)
    memory = Table(title="node peak memory above idle (MiB)")
    for column in ("node layers", "idle", "forward only", "with backward", "backward / forward"):
        memory.add_column(column)
    for node in results["nodes"]:
        forward = max(node["forward_peak_above_idle_mib"], 1e-9)
        memory.add_row(
            node["layers"],
            f"{node['idle_mib']:.0f}",
            f"{node['forward_peak_above_idle_mib']:.1f}",
            f"{node['training_peak_above_idle_mib']:.1f}",
            f"{node['training_peak_above_idle_mib'] / forward:.2f}",
        )
    Console().print(memory)
    write_json(args.json or Path(__file__).parent / "results" / f"train-{args.preset}.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
