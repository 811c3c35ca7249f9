"""Per-token latency: local `generate` vs the same checkpoint through swarms of 1, 2 and 3 nodes.

Every figure comes from one run on one machine: the local baseline is measured next to the swarm,
and the report is the ratio swarm/local plus the overhead each hop adds per token (medians). Local and
swarm generations alternate, and each swarm generation is compared with the local one just before it:
a shared machine's speed drifts by up to 2x over seconds, and pairs taken side by side see the same drift.

    python bench/latency.py --preset tiny
    python bench/latency.py --preset 250m --nodes 1,2,3 --repeats 3
    python bench/latency.py --preset tiny --family bloom    # any supported model_type, at the preset's size
    python bench/latency.py --preset tiny --compression int8-block   # 8-bit hidden states on the wire
    python bench/latency.py --preset h512 --threads 1      # every process pinned to one torch thread

By default every process runs as a user would start it (torch picks its threads); `--threads N` gives the
local baseline and every node N torch threads instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository first, not bench/ (see bench/__init__.py)

from swarm.runtime import quiet_optional_backends

quiet_optional_backends()  # before transformers imports torchao, which logs what this machine cannot load

import argparse
import itertools
import tempfile

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LogitsProcessorList

from bench.common import PRESETS, THREADS_HELP, TokenClock, build_random_model, median, use_threads, write_json
from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm
from swarm.models import supported_model_types


def time_generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> list[float]:
    """Decode ms of every token over `repeats` greedy generations (prefill excluded)."""
    intervals: list[float] = []
    for _ in range(repeats):
        clock = TokenClock()
        model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
        intervals += clock.per_token_ms()
    return intervals


def logits_error(remote: torch.nn.Module, local: torch.nn.Module, prompt: torch.Tensor) -> float:
    """||swarm - local|| / ||local|| over the prompt's logits: 0 without compression (float32 nodes)."""
    with torch.inference_mode():
        reference = local(prompt).logits
        return ((remote(prompt).logits - reference).norm() / reference.norm()).item()


def spans(num_layers: int, parts: int) -> list[str]:
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [f"{a}-{b - 1}" for a, b in itertools.pairwise(bounds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--family", choices=supported_model_types(), default="llama", help="random model family")
    parser.add_argument("--model", type=Path, help="use this checkpoint instead of a random preset")
    parser.add_argument("--nodes", default="1,2,3", help="swarm sizes to measure (default 1,2,3)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compression",
        choices=["none", "int8-block"],
        default="none",
        help="hidden states on the wire; the report adds the logits' error against the local model",
    )
    parser.add_argument("--threads", default="default", help=THREADS_HELP)
    parser.add_argument("--json", type=Path, help="where to write results (default bench/results/latency-PRESET.json)")
    args = parser.parse_args()
    threads = use_threads(args.threads)
    cache_dir = Path(tempfile.gettempdir()) / "swarm-bench"
    model_path = args.model or build_random_model(args.preset, cache_dir / f"{args.family}-{args.preset}", args.family)
    random_name = args.preset if args.family == "llama" else f"{args.family}-{args.preset}"
    label = args.model.name if args.model else random_name
    suffix = ("" if args.compression == "none" else f"-{args.compression}") + (f"-threads{threads}" if threads else "")

    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    num_layers = local.config.num_hidden_layers
    prompt = torch.randint(
        3, local.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    time_generate(local, prompt, 4, 1)  # warm-up

    rows = []
    local_intervals: list[float] = []
    for parts in (int(n) for n in args.nodes.split(",")):
        with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir), threads=threads) as swarm:
            swarm.start_registry()
            for layers in spans(num_layers, parts):
                swarm.start_node(model_path, layers)
            swarm.wait_ready()
            remote = DistributedModelForCausalLM.from_pretrained(
                model_path, registry=swarm.registry_url, compression=args.compression
            )
            try:
                time_generate(remote, prompt, 4, 1)
                pairs = []
                for _ in range(args.repeats):
                    local_ms = time_generate(local, prompt, args.new_tokens, 1)
                    swarm_ms = time_generate(remote, prompt, args.new_tokens, 1)
                    local_intervals += local_ms
                    pairs.append((median(local_ms), median(swarm_ms)))
                error = logits_error(remote, local, prompt)
            finally:
                remote.close()
        rows.append(
            {
                "nodes": parts,
                "swarm_ms_per_token": median([swarm for _, swarm in pairs]),
                "paired_local_ms_per_token": median([local for local, _ in pairs]),
                "overhead_ms_per_hop": median([(swarm - local) / parts for local, swarm in pairs]),
                "ratio": median([swarm / local for local, swarm in pairs]),
                "logits_relative_error": error,
            }
        )
    local_ms = median(local_intervals)
    for row in rows:
        row["local_ms_per_token"] = local_ms

    title = f"decode latency, {label} ({num_layers} layers), {args.new_tokens} new tokens, threads {args.threads}"
    table = Table(title=f"{title}, compression {args.compression}")
    for column in ("nodes", "local ms/token", "swarm ms/token", "swarm/local", "overhead ms/hop", "logits rel. err"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["nodes"]),
            f"{local_ms:.2f}",
            f"{row['swarm_ms_per_token']:.2f}",
            f"{row['ratio']:.3f}",
            f"{row['overhead_ms_per_hop']:.3f}",
            f"{row['logits_relative_error']:.2e}",
        )
    Console().print(table)
    out = args.json or Path(__file__).parent / "results" / f"latency-{label}{suffix}.json"
    write_json(
        out,
        {
            "benchmark": "latency",
            "model": label,
            "num_layers": num_layers,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "compression": args.compression,
            "threads": args.threads,
            "results": rows,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
