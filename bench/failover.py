"""Failover time: from a node's kill -9 to the next token delivered, with a replacement present.

Each round generates through registry + node A (first half) + two redundant nodes for the second
half, kills the one in use mid-generation, and measures the gap until the next token; the killed
node then comes back for the next round. Reported next to the per-token latency of the same run.

    python bench/failover.py --kills 5
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
from collections.abc import Callable
from functools import partial
from itertools import pairwise

import torch
from rich.console import Console
from rich.table import Table
from transformers import LogitsProcessor, LogitsProcessorList

from bench.common import PRESETS, median, swarm_bench_setup, write_json
from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm, Process


class KillAndClock(LogitsProcessor):
    """Timestamps every token; at step `kill_at` kills the second-half node the chain uses."""

    def __init__(self, kill_at: int, kill: Callable[[], None]) -> None:
        self.kill_at, self.kill = kill_at, kill
        self.stamps: list[float] = []
        self.killed_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.kill_at:
            self.kill()
            self.killed_at = time.perf_counter()
        return scores


def kill_node_in_use(model: DistributedModelForCausalLM, candidates: list[Process], killed: list[Process]) -> None:
    """kill -9 whichever candidate the running generation's chain goes through."""
    in_use = set(model.current_chain())
    killed.append(next(node for node in candidates if node.address in in_use))
    killed[-1].kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_path, num_layers, prompt = swarm_bench_setup(args.preset)
    half = num_layers // 2
    failover_ms: list[float] = []
    token_ms: list[float] = []
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        swarm.start_registry()
        swarm.start_node(model_path, f"0-{half - 1}")
        second = [swarm.start_node(model_path, f"{half}-{num_layers - 1}") for _ in range(2)]
        swarm.wait_ready()
        model = DistributedModelForCausalLM.from_pretrained(model_path, registry=swarm.registry_url)
        try:
            for round_index in range(args.kills):
                victims: list[Process] = []
                clock = KillAndClock(args.new_tokens // 2, partial(kill_node_in_use, model, second, victims))
                model.generate(
                    prompt,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([clock]),
                )
                after = next(stamp for stamp in clock.stamps if stamp > clock.killed_at)
                failover_ms.append((after - clock.killed_at) * 1000)
                gaps = [(b - a) * 1000 for a, b in pairwise(clock.stamps) if not a <= clock.killed_at < b]
                token_ms += gaps[1:]
                restarted = swarm.restart(victims[0])
                second[second.index(victims[0])] = restarted
                swarm.wait_online(restarted)  # the next round has a spare again
                print(f"kill {round_index + 1}: next token {failover_ms[-1]:.1f} ms after the kill", file=sys.stderr)
        finally:
            model.close()
    failover, per_token = median(failover_ms), median(token_ms)
    table = Table(title=f"failover, {args.preset} ({num_layers} layers), {args.kills} kills, medians")
    for column in ("kill -> next token (ms)", "per-token latency (ms)", "failover / token"):
        table.add_column(column, justify="right")
    table.add_row(f"{failover:.1f}", f"{per_token:.2f}", f"{failover / per_token:.1f}x")
    Console().print(table)
    out = args.json or Path(__file__).parent / "results" / f"failover-{args.preset}.json"
    write_json(
        out,
        {
            "benchmark": "failover",
            "model": args.preset,
            "kills": args.kills,
            "failover_ms": failover_ms,
            "median_failover_ms": failover,
            "median_token_ms": per_token,
            "ratio": failover / per_token,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
