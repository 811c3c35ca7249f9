"""The running node: load the span, serve it, keep the registries informed, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import socket
import sys
import time

import torch
import websockets

from swarm.checkpoint import CheckpointIndex, model_name_from_path
from swarm.errors import RegistryUnavailableError, SwarmError, format_layer_range
from swarm.http import http_router
from swarm.identity import model_id
from swarm.memory import ModelFootprint, default_memory_budget, parse_bytes
from swarm.models import ModelArchitecture
from swarm.node.announcer import Announcer
from swarm.node.plan import SpanPlan, plan_span
from swarm.node.server import NodeIdentity, NodeServer
from swarm.node.settings import NodeSettings
from swarm.node.span import LoadedSpan
from swarm.protocol import PeerInfo
from swarm.registry.client import fetch_peers
from swarm.tensors import DTYPE_NAMES, WIRE_DTYPES
from swarm.transport import HELLO_MAX_BYTES, Credentials, server_ssl_context

log = logging.getLogger("swarm.node")


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
        model_id=model_id(model),
    )
    node = NodeServer(settings, identity)
    server = await websockets.serve(
        node.handle,
        settings.host,
        settings.port,
        max_size=2 * HELLO_MAX_BYTES,  # until a connection's hello is accepted (`NodeServer.handle` raises it)
        compression=None,
        ping_interval=20,
        ping_timeout=60,
        ssl=server_ssl_context(settings.tls_cert, settings.tls_key),
        process_request=http_router(node.http_routes(), settings.token),
    )
    port = server.sockets[0].getsockname()[1]
    identity.address = settings.public_address or default_address(settings.host, port, bool(settings.tls_cert))
    announcer = Announcer(settings.registry, node.peer_info, settings.announce_interval, credentials)
    announcer.start()
    stop = _stop_event()
    log.info("node %s: loading layers %s of %s", identity.peer_id, format_layer_range(start, end), identity.model_name)
    loop = asyncio.get_running_loop()
    span = await loop.run_in_executor(
        None, LoadedSpan.load, model, start, end, device, dtype, settings.progress, settings.quantize, settings.compile
    )
    node.take_span(span)
    threads = await loop.run_in_executor(None, node.span.plan_threads)
    node.throughput = await loop.run_in_executor(None, node.span.measure_throughput)
    node.state = "online"
    announcer.announce_now()
    log.info(
        "node %s online at %s: layers %s of %s (%s, %.0f layer-steps/s, %s), registries %s",
        identity.peer_id,
        identity.address,
        format_layer_range(start, end),
        identity.model_name,
        identity.dtype,
        node.throughput,
        threads.describe(),
        ",".join(settings.registry),
    )
    expiry = asyncio.create_task(_expire_sessions(node))
    probing = asyncio.create_task(node.latencies.run())
    await stop.wait()
    probing.cancel()
    await drain(node, announcer)
    expiry.cancel()
    await announcer.stop(leave=True)
    await node.relays.close()
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
        settings = node.settings
        timeouts = (settings.session_idle_timeout, settings.max_session_seconds, settings.first_step_timeout)
        await asyncio.sleep(min(10.0, *(timeout / 2 for timeout in timeouts)))
        node.expire_sessions()


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop
