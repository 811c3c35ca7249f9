"""One linear layer on a CPU: `F.linear` (MKL, which re-packs the weight on every call) against the weight laid
out once for oneDNN (`swarm.models.packed.PackedLinear`, what nodes and the client run), at the row counts of a
decode round: 1 token, and 4, 16 or 64 sessions' tokens together.

The shapes are the 250m preset's layer (fused qkv, output, fused gate and up, down) and LM head, and the fused
gate and up projection of a 7B Llama. Reports median milliseconds per call and the speedup (plain / packed), on
torch's default thread count and on one thread.

    python bench/linear.py
    python bench/linear.py --dtype bfloat16 --rows 1,16
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository first, not bench/ (see bench/__init__.py)

from swarm.runtime import quiet_optional_backends

quiet_optional_backends()  # before transformers imports torchao, which logs what this machine cannot load

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from bench.common import write_json
from swarm.models.packed import PackedLinear, packable_dtypes

SHAPES: dict[str, tuple[int, int]] = {
    "250m qkv": (2048, 1024),
    "250m out": (1024, 1024),
    "250m gate+up": (5632, 1024),
    "250m down": (1024, 2816),
    "250m head": (32000, 1024),
    "7B gate+up": (22016, 4096),
}


def milliseconds(call: Callable[[], object], seconds: float) -> float:
    """Median time of one call, calls repeated for about `seconds` after a warm-up."""
    for _ in range(3):
        call()
    timings: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(timings) < 5:
        began = time.perf_counter()
        call()
        timings.append(time.perf_counter() - began)
    return statistics.median(timings) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rows", default="1,4,16,64", help="rows (tokens) per call, comma-separated")
    parser.add_argument("--seconds", type=float, default=0.3, help="time spent per measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if dtype not in packable_dtypes():
        print(f"this CPU has no oneDNN kernels for {args.dtype}: nothing would be packed", file=sys.stderr)
        return 1
    rows = [int(n) for n in args.rows.split(",")]
    default_threads = torch.get_num_threads()
    results = []
    table = Table(title=f"linear layer, {args.dtype}: plain F.linear vs packed for oneDNN (median ms per call)")
    for column in ("shape", "rows", "threads", "plain ms", "packed ms", "speedup"):
        table.add_column(column, justify="right")
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, (outputs, inputs) in SHAPES.items():
            plain = nn.Linear(inputs, outputs, bias=False).to(dtype)
            packed = PackedLinear(plain)
            for threads in sorted({default_threads, 1}, reverse=True):
                torch.set_num_threads(threads)
                for count in rows:
                    x = torch.randn(1, count, inputs, dtype=dtype)
                    plain_ms = milliseconds(lambda: F.linear(x, plain.weight), args.seconds)  # noqa: B023
                    packed_ms = milliseconds(lambda: packed(x), args.seconds)  # noqa: B023
                    results.append(
                        dict(shape=name, out_features=outputs, in_features=inputs, rows=count, threads=threads)
                        | dict(plain_ms=plain_ms, packed_ms=packed_ms, speedup=plain_ms / packed_ms)
                    )
                    table.add_row(
                        name,
                        str(count),
                        str(threads),
                        f"{plain_ms:.3f}",
                        f"{packed_ms:.3f}",
                        f"{plain_ms / packed_ms:.2f}x",
                    )
            torch.set_num_threads(default_threads)
    Console().print(table)
    out = args.json or Path(__file__).parent / "results" / f"linear-{args.dtype}.json"
    write_json(
        out, {"benchmark": "linear", "dtype": args.dtype, "default_threads": default_threads, "results": results}
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
