"""Where a decode step's time goes, per process: the client and every node, sampled while they generate.

Starts a swarm of `--nodes` nodes on a random preset, generates greedily for `--seconds` while `py-spy` samples
the client and each node, and prints for each process its CPU time per token (from /proc, the ground truth)
and how its samples split into buckets:

- client: `generate loop` (transformers' decoding and logits processors), `embed + head` (the local modules),
  `chain` (sessions, links, history: swarm's bookkeeping per hop), `wire` (encoding, decoding, websockets),
  `event loop` (asyncio and the hand-off between the caller's thread and the client's loop);
- node: `forward` (the layers and their attention), `cache` (setting up a round's cache views and masks),
  `validation`, `schedule` (rounds, futures), `wire`, `event loop`.

A sample counts for the innermost bucket its stack passes through. Sampling sees a process that the kernel
has just descheduled (after it wrote a reply, say) as busy, so shares of `wire` run high on a machine with
fewer cores than processes; the CPU times do not have that bias.

    python bench/profile.py --preset tiny
    python bench/profile.py --preset h512 --nodes 2 --threads 1
    python bench/profile.py --preset tiny --top 15        # and each process's 15 hottest functions (self time)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository first, not bench/ (see bench/__init__.py)

from swarm.runtime import quiet_optional_backends

quiet_optional_backends()  # before transformers imports torchao, which logs what this machine cannot load

import argparse
import collections
import itertools
import os
import subprocess
import tempfile
import time

import torch

from bench.common import PRESETS, THREADS_HELP, build_random_model, cpu_seconds, use_threads, write_json
from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm

CLIENT_BUCKETS = (  # innermost first wins: checked from the leaf of each stack towards its root
    ("wire", ("swarm/protocol.py", "websockets/", "client/core/channel.py", "swarm/transport.py", "msgpack")),
    ("embed + head", ("swarm/models/", "torch/nn/modules/")),
    ("chain", ("client/core/",)),
    ("event loop", ("asyncio/", "concurrent/futures", "threading.py")),
    ("generate loop", ("transformers/",)),
)
NODE_BUCKETS = (
    ("cache", ("node/kv_cache.py",)),
    ("forward", ("swarm/models/", "node/span.py", "torch/")),
    ("validation", ("node/validation.py",)),
    ("wire", ("swarm/protocol.py", "websockets/", "swarm/transport.py", "msgpack")),
    ("schedule", ("node/steps.py", "node/chunking.py", "node/sessions.py", "node/server.py")),
    ("event loop", ("asyncio/", "uvloop", "runners.py")),
)


def bucket_of(frames: list[str], buckets: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    for frame in reversed(frames):
        for name, markers in buckets:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def read_samples(
    path: Path, buckets: tuple[tuple[str, tuple[str, ...]], ...]
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Samples per bucket, and per innermost function (its self time)."""
    counts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            frames = stack.split(";")
            counts[bucket_of(frames, buckets)] += int(count)
            leaves[short_frame(frames[-1])] += int(count)
    return counts, leaves


def short_frame(frame: str) -> str:
    """`function (path/to/file.py:line)` as `function (file.py)`: lines of one function add up."""
    function, _, where = frame.partition(" (")
    return f"{function} ({Path(where.rstrip(')').rpartition(':')[0]).name})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", default="default", help=THREADS_HELP)
    parser.add_argument("--top", type=int, default=0, help="also list each process's N hottest functions")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = use_threads(args.threads)
    model = build_random_model(args.preset, Path(tempfile.gettempdir()) / "swarm-bench" / f"llama-{args.preset}")
    layers = PRESETS[args.preset]["num_hidden_layers"]
    bounds = [round(i * layers / args.nodes) for i in range(args.nodes + 1)]
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir), threads=threads) as swarm:
        swarm.start_registry()
        nodes = [swarm.start_node(model, f"{a}-{b - 1}") for a, b in itertools.pairwise(bounds)]
        swarm.wait_ready()
        remote = DistributedModelForCausalLM.from_pretrained(model, registry=swarm.registry_url)
        try:
            remote.generate(prompt, max_new_tokens=8, do_sample=False)
            pids = {
                "client": os.getpid(),
                **{f"node {n.args[n.args.index('--layers') + 1]}": n.popen.pid for n in nodes},
            }
            samples = {name: Path(workdir) / f"{index}.txt" for index, name in enumerate(pids)}
            spies = [
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--format",
                        "raw",
                        "--rate",
                        "500",
                        "--nonblocking",
                        "--duration",
                        str(int(args.seconds)),
                        "--pid",
                        str(pid),
                        "--output",
                        str(samples[name]),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, pid in pids.items()
            ]
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            began, tokens = time.perf_counter(), 0
            while time.perf_counter() - began < args.seconds:
                remote.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                tokens += 32
            elapsed = time.perf_counter() - began
            cpu = {name: (cpu_seconds(pid) - before[name]) / tokens * 1000 for name, pid in pids.items()}
            for spy in spies:
                spy.wait(timeout=60)
        finally:
            remote.close()
        report = {}
        print(f"{args.preset}, {args.nodes} node(s), threads {args.threads}: {1000 * elapsed / tokens:.2f} ms/token")
        for name in pids:
            buckets = CLIENT_BUCKETS if name == "client" else NODE_BUCKETS
            empty: collections.Counter[str] = collections.Counter()
            counts, leaves = read_samples(samples[name], buckets) if samples[name].exists() else (empty, empty)
            total = sum(counts.values()) or 1
            shares = {bucket: counts[bucket] / total for bucket, _ in (*buckets, ("other", ()))}
            hottest = {function: count / total for function, count in leaves.most_common(args.top)}
            report[name] = {"cpu_ms_per_token": cpu[name], "sample_shares": shares, "hottest": hottest}
            split = ", ".join(f"{bucket} {100 * share:.0f}%" for bucket, share in shares.items() if share >= 0.005)
            print(f"  {name:12s} {cpu[name]:6.2f} ms CPU/token: {split}")
            for function, share in hottest.items():
                print(f"      {100 * share:5.1f}%  {function}")
    out = args.json or Path(__file__).parent / "results" / f"profile-{args.preset}-{args.nodes}.json"
    write_json(out, {"benchmark": "profile", "preset": args.preset, "nodes": args.nodes, "processes": report})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
