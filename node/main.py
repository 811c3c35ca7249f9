"""`swarm-node`: load a span of layers, serve it, and keep the registries informed."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import socket
import sys
import time

import torch
import websockets

from node.announcer import Announcer
from node.plan import SpanPlan, plan_span
from node.server import NodeIdentity, NodeServer
from node.settings import NodeSettings
from node.span import LoadedSpan
from swarm.checkpoint import CheckpointIndex, model_name_from_path
from swarm.errors import RegistryUnavailableError, SwarmError, format_layer_range
from swarm.http import http_router
from swarm.memory import ModelFootprint, default_memory_budget, parse_bytes
from swarm.models import ModelArchitecture
from swarm.protocol import DTYPE_NAMES, WIRE_DTYPES, PeerInfo
from swarm.registry_client import fetch_peers
from swarm.runtime import run, setup_logging
from swarm.transport import Credentials, server_ssl_context

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
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default float32 on CPU, the checkpoint's dtype on GPU)",
    )
    add("--max-sessions", type=int, help="concurrent sessions (default 64)")
    add("--cache-tokens", type=int, help="KV cache budget in tokens, summed over sessions (default 65536)")
    add("--max-batch-size", type=int, help="largest batch a session may use (default 64)")
    add("--max-length", type=int, help="longest sequence a session may hold (default 8192)")
    add("--max-message-bytes", type=int, help="largest frame accepted; larger ones get too_large (default 64 MiB)")
    add("--token", help="shared secret of a private swarm (env SWARM_TOKEN)")
    add("--tls-cert", help="serve wss:// with this certificate (PEM); needs --tls-key")
    add("--tls-key", help="private key (PEM) of --tls-cert")
    add("--tls-ca", help="CA certificate to trust for wss:// registries (env SWARM_TLS_CA)")
    add("--announce-interval", type=float, help="seconds between heartbeats (default 5)")
    add("--session-idle-timeout", type=float, help="seconds before an idle session is freed (default 300)")
    add("--max-session-seconds", type=float, help="longest a session may stay open (default 86400)")
    add("--drain-timeout", type=float, help="on SIGTERM, seconds to let clients move away (default 15)")
    add("--torch-threads", type=int, help="CPU threads for torch (default: torch's own choice)")
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
    add("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return parser


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    values = {key: value for key, value in vars(args).items() if value is not None and key not in ("gpu", "log_level")}
    if args.gpu is not None:
        values["device"] = f"cuda:{args.gpu}"
    return NodeSettings(**values)


def resolve_device_and_dtype(
    settings: NodeSettings, checkpoint_dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SwarmError(f"--device {settings.device}: no CUDA GPU is visible to torch; use --device cpu")
    if settings.dtype is not None:
        dtype = WIRE_DTYPES[settings.dtype]
    elif device.type == "cpu":
        dtype = torch.float32
    else:
        dtype = checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if device.type == "cpu" and dtype == torch.float16:
        raise SwarmError("float16 is not supported on CPU (too slow and inexact there); use bfloat16 or float32")
    return device, dtype


def default_address(host: str, port: int, tls: bool) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"{'wss' if tls else 'ws'}://{host}:{port}"


async def serve(settings: NodeSettings) -> None:
    model = settings.model or str(_default_model())
    architecture = ModelArchitecture.of(model)
    device, dtype = resolve_device_and_dtype(settings, WIRE_DTYPES.get(architecture.stored_dtype or ""))
    model_name = model_name_from_path(model, settings.model_name)
    credentials = Credentials(settings.token, settings.tls_ca)
    weights_dtype = settings.quantize or DTYPE_NAMES[dtype]
    plan = await make_plan(settings, model, architecture, weights_dtype, model_name, credentials)
    start, end = plan.start, plan.end
    print(plan.describe(architecture.num_layers, weights_dtype, settings.cache_tokens), file=sys.stderr, flush=True)
    identity = NodeIdentity(
        peer_id=secrets.token_hex(8),
        model_name=model_name,
        num_layers=architecture.num_layers,
        start=start,
        end=end,
        dtype=dtype,
        hidden_size=architecture.hidden_size,
    )
    node = NodeServer(settings, identity)
    server = await websockets.serve(
        node.handle,
        settings.host,
        settings.port,
        max_size=settings.max_message_bytes * 2,
        compression=None,
        ping_interval=20,
        ping_timeout=60,
        ssl=server_ssl_context(settings.tls_cert, settings.tls_key),
        process_request=http_router(node.http_routes()),
    )
    port = server.sockets[0].getsockname()[1]
    identity.address = settings.public_address or default_address(settings.host, port, bool(settings.tls_cert))
    announcer = Announcer(settings.registry, node.peer_info, settings.announce_interval, credentials)
    announcer.start()
    stop = _stop_event()
    log.info("node %s: loading layers %s of %s", identity.peer_id, format_layer_range(start, end), identity.model_name)
    loop = asyncio.get_running_loop()
    node.span = await loop.run_in_executor(
        None, LoadedSpan.load, model, start, end, device, dtype, settings.progress, settings.quantize
    )
    if settings.compile:
        node.span.stack.compile()  # compiled by the first steps, here: measuring throughput runs a few
    node.throughput = await loop.run_in_executor(None, node.span.measure_throughput)
    node.state = "online"
    announcer.announce_now()
    log.info(
        "node %s online at %s: layers %s of %s (%s, %.0f layer-steps/s), registries %s",
        identity.peer_id,
        identity.address,
        format_layer_range(start, end),
        identity.model_name,
        identity.dtype,
        node.throughput,
        ",".join(settings.registry),
    )
    expiry = asyncio.create_task(_expire_sessions(node))
    await stop.wait()
    await drain(node, announcer)
    expiry.cancel()
    await announcer.stop(leave=True)
    server.close()
    await server.wait_closed()


async def make_plan(
    settings: NodeSettings,
    model: str,
    architecture: ModelArchitecture,
    dtype: str,
    model_name: str,
    credentials: Credentials,
) -> SpanPlan:
    """The span to host; `--layers auto` asks the registries which layers need help most."""
    auto = settings.layers.strip().lower() == "auto"
    budget = parse_bytes(settings.max_memory) if settings.max_memory else None
    if auto and budget is None:
        budget = default_memory_budget(settings.device)
    peers: list[PeerInfo] = []
    if auto:
        try:
            peers = await fetch_peers(settings.registry, model_name, credentials)
        except RegistryUnavailableError as exc:
            log.warning("no registry answered (%s); placing the span from layer 0", exc)
    footprint = ModelFootprint.of(CheckpointIndex.open(model), architecture)
    return plan_span(footprint, settings.layers, budget, dtype, settings.cache_tokens, peers)


async def drain(node: NodeServer, announcer: Announcer) -> None:
    """Stop taking work, tell the registries, and give clients time to move their sessions.

    Steps arriving while draining get `busy`, which clients treat as "fail over now"."""
    node.state = "draining"
    announcer.announce_now()
    log.info("node %s draining: %d session(s) open", node.identity.peer_id, len(node.sessions))
    deadline = time.monotonic() + node.settings.drain_timeout
    while len(node.sessions) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    log.info("node %s stopping (%d session(s) left)", node.identity.peer_id, len(node.sessions))


def _default_model() -> object:
    from swarm.default_model import default_model_path

    return default_model_path()


async def _expire_sessions(node: NodeServer) -> None:
    while True:
        await asyncio.sleep(min(10.0, node.settings.session_idle_timeout / 2, node.settings.max_session_seconds / 2))
        node.expire_sessions()


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        settings = settings_from_args(args)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        run(serve(settings))
    except (SwarmError, ValueError) as exc:
        print(f"swarm-node: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
