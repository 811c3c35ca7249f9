"""Aggregate throughput: 1, 4, 16 and 32 concurrent sessions through a 2-node swarm.

Each session is its own client thread generating greedily on its own swarm session, measured two ways:
through the client's `DecodeScheduler` (what the gateway and `batch` use: concurrent sessions share ticks)
and as one Hugging Face `generate()` per thread. The baseline is local `generate` on the same checkpoint
with the same batch size, in the same run. Reports aggregate tokens/s, p50/p99 per-token latency, and the
swarm/local throughput ratio. Local and swarm runs alternate and each ratio compares runs taken side by
side (a shared machine's speed drifts by up to 2x over seconds); the ratios reported are their medians.

    python bench/throughput.py --preset tiny --sessions 1,4,16,32
    python bench/throughput.py --preset h512 --sessions 1,8 --threads 1

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
import os
import statistics
import tempfile
import threading
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LogitsProcessorList

from bench.common import PRESETS, THREADS_HELP, TokenClock, build_random_llama, cpu_seconds, use_threads, write_json
from swarm.client import DistributedModelForCausalLM
from swarm.client.core.scheduler import DecodeScheduler
from swarm.client.local_swarm import LocalSwarm


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def local_batch(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> dict[str, float]:
    clock = TokenClock()
    began = time.perf_counter()
    model.generate(
        prompts,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    elapsed = time.perf_counter() - began
    per_token = clock.per_token_ms()
    return {
        "tokens_per_s": prompts.shape[0] * new_tokens / elapsed,
        "p50_ms": statistics.median(per_token),
        "p99_ms": percentile(per_token, 0.99),
    }


def swarm_sessions(
    model: DistributedModelForCausalLM,
    prompts: torch.Tensor,
    new_tokens: int,
    scheduler: DecodeScheduler | None = None,
    processes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One thread per session, all started together; through `scheduler` if given, else `model.generate`.

    With `processes` (name -> pid), also the CPU time each of them (and this client) spent per token: on a
    machine with fewer cores than processes, their sum bounds the throughput."""
    processes = {"client": os.getpid(), **(processes or {})}
    cpu_before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    clocks = [TokenClock() for _ in range(prompts.shape[0])]
    errors: list[BaseException] = []

    def session(index: int) -> None:
        processors = LogitsProcessorList([clocks[index]])
        try:
            if scheduler is not None:
                scheduler.generate(prompts[index : index + 1], max_new_tokens=new_tokens, logits_processor=processors)
            else:
                model.generate(
                    prompts[index : index + 1],
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    logits_processor=processors,
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(prompts.shape[0])]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    per_token = [ms for clock in clocks for ms in clock.per_token_ms()]
    tokens = prompts.shape[0] * new_tokens
    return {
        "tokens_per_s": tokens / elapsed,
        "p50_ms": statistics.median(per_token),
        "p99_ms": percentile(per_token, 0.99),
        "cpu_us_per_token": {
            name: (cpu_seconds(pid) - cpu_before[name]) / tokens * 1e6 for name, pid in processes.items()
        },
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (this machine is noisy), with every run's tokens/s beside it."""
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "runs_tokens_per_s": [run["tokens_per_s"] for run in runs]}


def paired_ratio(runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> float:
    """Median of run/baseline throughput over runs taken side by side."""
    return statistics.median(
        run["tokens_per_s"] / base["tokens_per_s"] for run, base in zip(runs, baselines, strict=True)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--sessions", default="1,4,16,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--threads", default="default", help=THREADS_HELP)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = use_threads(args.threads)
    model_path = build_random_llama(args.preset)
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    num_layers = local.config.num_hidden_layers
    counts = [int(n) for n in args.sessions.split(",")]
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, local.config.vocab_size, (max(counts), args.prompt_tokens), generator=generator)
    rows = []
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir), threads=threads) as swarm:
        swarm.start_registry()
        half = num_layers // 2
        spans = [f"0-{half - 1}", f"{half}-{num_layers - 1}"]
        nodes = {f"node {span}": swarm.start_node(model_path, span, "--max-sessions", "256") for span in spans}
        swarm.wait_ready()
        pids = {name: node.popen.pid for name, node in nodes.items()}
        remote = DistributedModelForCausalLM.from_pretrained(model_path, registry=swarm.registry_url)
        scheduler = DecodeScheduler(remote)
        try:
            swarm_sessions(remote, prompts[:1], 4)  # warm-up
            swarm_sessions(remote, prompts[:4], 4, scheduler)
            for count in counts:
                batch = prompts[:count]
                baselines, shared_runs, thread_runs = [], [], []
                for _ in range(args.repeats):
                    baselines.append(local_batch(local, batch, args.new_tokens))
                    shared_runs.append(swarm_sessions(remote, batch, args.new_tokens, scheduler, pids))
                    thread_runs.append(swarm_sessions(remote, batch, args.new_tokens))
                rows.append(
                    {
                        "sessions": count,
                        "swarm_scheduler": median_run(shared_runs),
                        "swarm_generate_per_thread": median_run(thread_runs),
                        "local": median_run(baselines),
                        "ratio": paired_ratio(shared_runs, baselines),
                        "ratio_generate_per_thread": paired_ratio(thread_runs, baselines),
                    }
                )
                shared = rows[-1]["swarm_scheduler"]
                print(f"{count} sessions: {shared['tokens_per_s']:.1f} tok/s", file=sys.stderr)
        finally:
            scheduler.close()
            remote.close()
    title = (
        f"throughput, {args.preset} ({num_layers} layers, 2 nodes), {args.new_tokens} new tokens, "
        f"median of {args.repeats}"
    )
    table = Table(title=title)
    columns = (
        "sessions",
        "swarm tok/s",
        "p50 ms",
        "p99 ms",
        "generate()/thread tok/s",
        "local batched tok/s",
        "swarm/local",
        "generate()/thread / local",
        "CPU µs/token (client, nodes)",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        shared = row["swarm_scheduler"]
        table.add_row(
            str(row["sessions"]),
            f"{shared['tokens_per_s']:.1f}",
            f"{shared['p50_ms']:.1f}",
            f"{shared['p99_ms']:.1f}",
            f"{row['swarm_generate_per_thread']['tokens_per_s']:.1f}",
            f"{row['local']['tokens_per_s']:.1f}",
            f"{row['ratio']:.2f}",
            f"{row['ratio_generate_per_thread']:.2f}",
            ", ".join(f"{us:.0f}" for us in shared["cpu_us_per_token"].values()),
        )
    Console().print(table)
    out = args.json or Path(__file__).parent / "results" / f"throughput-{args.preset}.json"
    payload = {"benchmark": "throughput", "model": args.preset, "new_tokens": args.new_tokens, "results": rows}
    write_json(out, {**payload, "repeats": args.repeats, "threads": args.threads})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
