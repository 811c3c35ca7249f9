"""Span verification: what it costs an honest swarm, and how soon it catches a lying peer.

Cost: the same generations with checking off, at the default rate, and checking every step, through one
full-span node (a second full-span node and two half-span nodes stand by as witnesses); ms per token and the
ratio to checking off, measured in the same run.

Detection: a lying node (`tests/swarm_sim/lying_node.py`, which claims to be the fastest peer, so a new client
tries it first) joins; a fresh client generates until it catches the liar, and the tokens it took are counted.
`noise` perturbs every answer (caught on the first step, which is always checked); `every:20` lies on one answer
in 20 (caught when a wrong one is sampled).

    python bench/verification.py --trials 3
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
from rich.console import Console
from rich.table import Table
from transformers import LogitsProcessor, LogitsProcessorList

from bench.common import PRESETS, median, swarm_bench_setup, write_json
from swarm.client import DistributedModelForCausalLM
from swarm.client.core.verify import DEFAULT_VERIFY_RATE
from swarm.client.local_swarm import LocalSwarm

LIAR = [sys.executable, str(Path(__file__).resolve().parents[1] / "tests" / "swarm_sim" / "lying_node.py")]


def ms_per_token(model: DistributedModelForCausalLM, prompt: torch.Tensor, tokens: int) -> float:
    began = time.perf_counter()
    model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return (time.perf_counter() - began) * 1000 / tokens


class CatchClock(LogitsProcessor):
    """Counts tokens until the client has caught a liar (checked as each token is chosen)."""

    def __init__(self, model: DistributedModelForCausalLM) -> None:
        self.model, self.tokens, self.caught_at = model, 0, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.tokens += 1
        if self.caught_at is None and self.model.verifier.caught:
            self.caught_at = self.tokens
        return scores


def tokens_to_catch(model: DistributedModelForCausalLM, prompt: torch.Tensor, chunk: int, budget: int) -> int | None:
    """Tokens generated (in generations of `chunk`) until the client caught a liar, or None within `budget`."""
    clock = CatchClock(model)
    while clock.tokens < budget and clock.caught_at is None:
        model.generate(
            prompt,
            max_new_tokens=chunk,
            min_new_tokens=chunk,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    return clock.caught_at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per timed generation")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per setting")
    parser.add_argument("--trials", type=int, default=3, help="fresh clients per lying mode")
    parser.add_argument("--budget", type=int, default=4000, help="most tokens a detection trial generates")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_path, num_layers, prompt = swarm_bench_setup(args.preset)
    half = num_layers // 2
    rates = {"off": 0.0, f"default ({DEFAULT_VERIFY_RATE:g})": DEFAULT_VERIFY_RATE, "every step": 1.0}
    cost: dict[str, list[float]] = {name: [] for name in rates}
    detection: dict[str, list[int | None]] = {"noise": [], "every:20": []}
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        swarm.start_registry()
        for layers in (f"0-{num_layers - 1}", f"0-{num_layers - 1}", f"0-{half - 1}", f"{half}-{num_layers - 1}"):
            swarm.start_node(model_path, layers)
        swarm.wait_ready()
        time.sleep(3)  # every node online
        models = {
            name: DistributedModelForCausalLM.from_pretrained(model_path, swarm.registry_url, verify_rate=rate)
            for name, rate in rates.items()
        }
        try:
            for model in models.values():
                ms_per_token(model, prompt, 4)  # connections open, peers proven
            for _ in range(args.repeats):  # interleaved, so drift hits every setting alike
                for name, model in models.items():
                    cost[name].append(ms_per_token(model, prompt, args.tokens))
            checks = {name: model.verifier.checks for name, model in models.items()}
        finally:
            for model in models.values():
                model.close()
        for lie in detection:
            liar = swarm.start_node(
                model_path, f"0-{num_layers - 1}", name=f"liar-{lie}", program=LIAR, env={"LIE": lie}
            )
            swarm.wait_online(liar)
            for trial in range(args.trials):
                model = DistributedModelForCausalLM.from_pretrained(model_path, swarm.registry_url)
                try:
                    caught = tokens_to_catch(model, prompt, 100, args.budget)
                finally:
                    model.close()
                detection[lie].append(caught)
                print(f"{lie} trial {trial + 1}: caught after {caught} tokens", file=sys.stderr)
            liar.kill()
    off = median(cost["off"])
    table = Table(title=f"span verification, {args.preset} ({num_layers} layers), medians of {args.repeats}")
    for column in ("checking", "ms / token", "ratio to off", "checks"):
        table.add_column(column, justify="right")
    for name in rates:
        table.add_row(name, f"{median(cost[name]):.2f}", f"{median(cost[name]) / off:.2f}", str(checks[name]))
    Console().print(table)
    found = Table(
        title=f"tokens until a new client (default rate) catches a liar (1: on its first step), {args.trials} trials"
    )
    for column in ("liar", "tokens per trial", "median"):
        found.add_column(column, justify="right")
    for lie, counts in detection.items():
        caught = [count for count in counts if count is not None]
        found.add_row(
            lie,
            ", ".join(str(c) if c is not None else "not caught" for c in counts),
            f"{median([float(c) for c in caught]):.0f}" if caught else "-",
        )
    Console().print(found)
    out = args.json or Path(__file__).parent / "results" / f"verification-{args.preset}.json"
    write_json(
        out,
        {
            "benchmark": "verification",
            "model": args.preset,
            "ms_per_token": cost,
            "median_ms_per_token": {name: median(values) for name, values in cost.items()},
            "ratio_to_off": {name: median(values) / off for name, values in cost.items()},
            "checks": checks,
            "tokens_to_catch": detection,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
