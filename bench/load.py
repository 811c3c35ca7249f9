"""Node start time and peak memory for a small span vs the whole model, from a sharded checkpoint.

A node reads only its own layers' tensors, so both figures should grow with the span, not with the
model. Measured on real node processes: time from spawn until the registry lists the node online,
and the process's peak resident memory (VmHWM) once it is up. Medians over `--repeats`.

    python bench/load.py --preset 250m --small 0-1 --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository first, not bench/ (see bench/__init__.py)

from swarm.runtime import quiet_optional_backends

quiet_optional_backends()  # before transformers imports torchao, which logs what this machine cannot load

import argparse
import statistics
import tempfile
import time

from rich.console import Console
from rich.table import Table

from bench.common import PRESETS, build_random_llama, write_json
from swarm.client.local_swarm import LocalSwarm
from swarm.settings import parse_layer_range


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc (Linux only)")


def measure(model: Path, layers: str, workdir: Path) -> tuple[float, int]:
    with LocalSwarm(workdir) as swarm:
        swarm.start_registry()
        began = time.perf_counter()
        node = swarm.start_node(model, layers)
        swarm.wait_online(node)
        elapsed = time.perf_counter() - began
        return elapsed, peak_rss_bytes(node.popen.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="250m")
    parser.add_argument("--small", default="0-1", help="the small span (default 0-1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = build_random_llama(args.preset)
    num_layers = PRESETS[args.preset]["num_hidden_layers"]
    spans = {"small": args.small, "all": f"0-{num_layers - 1}"}
    results: dict[str, dict[str, float]] = {}
    for label, layers in spans.items():
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as workdir:
                runs.append(measure(model, layers, Path(workdir)))
        start, end = parse_layer_range(layers)
        results[label] = {
            "layers": end - start,
            "start_s": statistics.median(r[0] for r in runs),
            "peak_rss_bytes": statistics.median(r[1] for r in runs),
        }
        print(f"{layers}: {results[label]}", file=sys.stderr)
    small, whole = results["small"], results["all"]
    table = Table(title=f"node load, {args.preset} ({num_layers} layers, sharded), medians of {args.repeats}")
    for column in ("span", "layers", "start (s)", "peak RSS (MiB)"):
        table.add_column(column, justify="right")
    for label, row in results.items():
        table.add_row(spans[label], str(row["layers"]), f"{row['start_s']:.2f}", f"{row['peak_rss_bytes'] / 2**20:.0f}")
    table.add_row(
        "small/all",
        f"{small['layers'] / whole['layers']:.3f}",
        f"{small['start_s'] / whole['start_s']:.3f}",
        f"{small['peak_rss_bytes'] / whole['peak_rss_bytes']:.3f}",
    )
    Console().print(table)
    out = args.json or Path(__file__).parent / "results" / f"load-{args.preset}.json"
    write_json(out, {"benchmark": "load", "model": args.preset, "spans": spans, "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
