"""Aggregate throughput: 1, 4, 16 and 32 concurrent sessions through a 2-node swarm.

Each session is its own client thread generating greedily; the baseline is local `generate` on the
same checkpoint with the same batch size, in the same run. Reports aggregate tokens/s, p50/p99
per-token latency, and the swarm/local throughput ratio.

    python bench/throughput.py --preset tiny --sessions 1,4,16,32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PRESETS, TokenClock, build_random_llama, write_json
from client import DistributedModelForCausalLM
from swarm.launcher import LocalSwarm


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


def swarm_sessions(model: DistributedModelForCausalLM, prompts: torch.Tensor, new_tokens: int) -> dict[str, float]:
    clocks = [TokenClock() for _ in range(prompts.shape[0])]
    errors: list[BaseException] = []

    def session(index: int) -> None:
        try:
            model.generate(
                prompts[index : index + 1],
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clocks[index]]),
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
    return {
        "tokens_per_s": prompts.shape[0] * new_tokens / elapsed,
        "p50_ms": statistics.median(per_token),
        "p99_ms": percentile(per_token, 0.99),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--sessions", default="1,4,16,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_path = build_random_llama(args.preset, Path(tempfile.gettempdir()) / "swarm-bench" / f"llama-{args.preset}")
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    num_layers = local.config.num_hidden_layers
    counts = [int(n) for n in args.sessions.split(",")]
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, local.config.vocab_size, (max(counts), args.prompt_tokens), generator=generator)
    rows = []
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        swarm.start_registry()
        half = num_layers // 2
        swarm.start_node(model_path, f"0-{half - 1}", "--max-sessions", "256")
        swarm.start_node(model_path, f"{half}-{num_layers - 1}", "--max-sessions", "256")
        swarm.wait_ready()
        remote = DistributedModelForCausalLM.from_pretrained(model_path, registry=swarm.registry_url)
        try:
            swarm_sessions(remote, prompts[:1], 4)  # warm-up
            for count in counts:
                baseline = local_batch(local, prompts[:count], args.new_tokens)
                measured = swarm_sessions(remote, prompts[:count], args.new_tokens)
                rows.append(
                    {
                        "sessions": count,
                        "swarm": measured,
                        "local": baseline,
                        "ratio": measured["tokens_per_s"] / baseline["tokens_per_s"],
                    }
                )
                print(f"{count} sessions: {measured['tokens_per_s']:.1f} tok/s", file=sys.stderr)
        finally:
            remote.close()
    table = Table(title=f"throughput, {args.preset} ({num_layers} layers, 2 nodes), {args.new_tokens} new tokens")
    for column in ("sessions", "swarm tok/s", "p50 ms", "p99 ms", "local batched tok/s", "swarm/local"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["sessions"]),
            f"{row['swarm']['tokens_per_s']:.1f}",
            f"{row['swarm']['p50_ms']:.1f}",
            f"{row['swarm']['p99_ms']:.1f}",
            f"{row['local']['tokens_per_s']:.1f}",
            f"{row['ratio']:.2f}",
        )
    Console().print(table)
    out = args.json or Path(__file__).parent / "results" / f"throughput-{args.preset}.json"
    write_json(out, {"benchmark": "throughput", "model": args.preset, "new_tokens": args.new_tokens, "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
