"""`swarm-node`: load a span of layers, serve it, and keep the registries informed.

This module parses the command line and prepares the process before torch is imported (thread settings
only take effect then); `swarm.node.service` does the rest.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from swarm.dtypes import FLOAT_DTYPE_NAMES
from swarm.node.settings import NodeSettings
from swarm.settings import environment_help

log = logging.getLogger("swarm.node")

EXAMPLES = """examples:
  swarm-node --layers 0-3                                  # the embedded demo model, first half
  swarm-node --model ./models/tiny-llama --layers 4-7 --registry ws://127.0.0.1:7000 --device cpu
  swarm-node --model ./models/llama-70b --layers 0-9 --gpu 0 --dtype bfloat16 --port 8100 --compile
  swarm-node --layers auto --max-memory 6GiB                # as many layers as fit, where they are missing
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-node",
        description="Host a contiguous span of a model's transformer layers for the swarm.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", help="Hugging Face checkpoint folder (env SWARM_MODEL; default: the embedded demo model)")
    add("--model-name", help="name in the swarm (default: last component of --model)")
    add(
        "--layers",
        help="inclusive layer range to host, e.g. 0-9, or auto: as many as fit in --max-memory, "
        "where the swarm needs them most (default auto)",
    )
    add(
        "--max-memory",
        help="memory budget for weights + KV cache, e.g. 6GiB (default: half the RAM on CPU, 90%% of free GPU memory)",
    )
    add("--registry", help="registry URL(s), comma-separated (env SWARM_REGISTRY; default ws://127.0.0.1:7000)")
    add("--host", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, help="port to listen on; 0 picks a free one (default 0)")
    add("--public-address", help="ws:// URL clients should use, when it differs from host:port")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--device", help="torch device, e.g. cpu or cuda:1 (default cpu)")
    device.add_argument("--gpu", type=int, metavar="N", help="shortcut for --device cuda:N")
    add(
        "--dtype",
        choices=FLOAT_DTYPE_NAMES,
        help="compute dtype (default float32 on CPU, the checkpoint's dtype on GPU)",
    )
    add("--max-sessions", type=int, help="concurrent sessions (default 64)")
    add("--cache-tokens", type=int, help="KV cache budget in tokens, summed over sessions (default 65536)")
    add("--max-batch-size", type=int, help="largest batch a session may use (default 64)")
    add("--max-length", type=int, help="longest sequence a session may hold (default 8192)")
    add("--max-message-bytes", type=int, help="largest frame accepted; larger ones get too_large (default 64 MiB)")
    add(
        "--max-forward-tokens",
        type=int,
        help="most tokens (batch x length) one stateless forward may carry (default 8192)",
    )
    add(
        "--no-training",
        dest="training",
        action="store_const",
        const=False,
        help="refuse backward requests: lend the layers for inference only (training is on by default)",
    )
    add(
        "--max-training-tokens",
        type=int,
        help="most tokens (batch x length) one backward may carry (default 4096)",
    )
    add(
        "--max-adapter-bytes",
        type=int,
        help="largest low-rank adapter a session or pass may bring (default 16 MiB)",
    )
    add(
        "--max-sessions-per-client",
        type=int,
        help="sessions one client may hold: one connection, and all connections from one IP address (an IPv6 /64) "
        "together; loopback connections count alone (default: half of --max-sessions)",
    )
    add(
        "--max-cache-share-per-client",
        type=float,
        metavar="SHARE",
        help="share of --cache-tokens one client may reserve; its first session may exceed it (default 0.5)",
    )
    add(
        "--max-steps-per-second-per-client",
        type=float,
        metavar="N",
        help="step and forward frames one client may send a second, after a burst of one second's worth; "
        "more get busy (default 0: no limit)",
    )
    add("--hello-timeout", type=float, help="seconds a new connection has to say hello before it is closed (default 5)")
    add(
        "--first-step-timeout",
        type=float,
        help="seconds a session may wait for its first step before it is freed (default 30)",
    )
    add("--token", help="shared secret of a private swarm (env SWARM_TOKEN)")
    add("--tls-cert", help="serve wss:// with this certificate (PEM); needs --tls-key")
    add("--tls-key", help="private key (PEM) of --tls-cert")
    add("--tls-ca", help="CA certificate to trust for wss:// registries (env SWARM_TLS_CA)")
    add("--announce-interval", type=float, help="seconds between heartbeats (default 5)")
    add(
        "--probe-interval",
        type=float,
        help="seconds between listings of the peers that may follow this node, whose round trips it measures and "
        "announces (default 30)",
    )
    add("--session-idle-timeout", type=float, help="seconds before an idle session is freed (default 300)")
    add("--max-session-seconds", type=float, help="longest a session may stay open (default 86400)")
    add("--drain-timeout", type=float, help="on SIGTERM, seconds to let clients move away (default 15)")
    add(
        "--torch-threads",
        type=int,
        help="CPU threads for torch (default: torch's own choice); small rounds run on one where it measured faster",
    )
    add("--quantize", choices=["int8"], help="store linear weights as int8 (torchao, weight-only; CPU or GPU)")
    add(
        "--compile",
        action="store_const",
        const=True,
        help="torch.compile the layers before going online (GPU: fuses a decode step's small operations)",
    )
    add("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar while loading")
    add(
        "--no-batching",
        dest="batch_steps",
        action="store_const",
        const=False,
        help="run every session's step alone (batching concurrent decode steps is on by default)",
    )
    add(
        "--prefill-chunk",
        type=int,
        metavar="N",
        help="compute steps longer than N tokens (long prompts) N tokens at a time, letting other sessions' "
        "steps run in between; 0 never splits (default 256)",
    )
    add("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    parser.epilog = EXAMPLES + "\n" + environment_help(parser, NodeSettings)
    return parser


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    """Flags over `SWARM_*` variables over defaults; `--gpu N` is `--device cuda:N`."""
    flags = vars(args) | ({"device": f"cuda:{args.gpu}"} if args.gpu is not None else {})
    return NodeSettings.from_flags(flags)


def prepare_threads(torch_threads: int | None) -> None:
    """Thread settings, made before torch loads (OpenMP reads its environment once, when it starts).

    OpenMP's worker threads spin after every parallel region by default, waiting for the next one. A node
    shares its machine with other swarm processes (the client, other nodes) that need the core right after
    its step, so nodes let idle threads sleep (`OMP_WAIT_POLICY=PASSIVE`) unless the environment says
    otherwise; on a machine whose cores are the node's alone, `OMP_WAIT_POLICY=ACTIVE` keeps them spinning.
    `--torch-threads` sets how many threads torch uses (default: torch's own choice, the physical cores); rounds
    too small to gain from them run on one (`swarm.node.threads`)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from swarm.runtime import setup_logging

    try:
        settings = settings_from_args(args)
        setup_logging(settings.log_level)
        prepare_threads(settings.torch_threads)
        from swarm.errors import SwarmError
        from swarm.node.service import serve
        from swarm.runtime import run

        try:
            run(serve(settings))
        except SwarmError as exc:
            raise ValueError(str(exc)) from exc
    except ValueError as exc:
        print(f"swarm-node: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
