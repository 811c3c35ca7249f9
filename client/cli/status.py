"""What the swarm serves right now, for `swarm-client status` and for readiness checks."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from swarm.client.core.planner import fetch_peers
from swarm.client.core.settings import ClientSettings
from swarm.errors import RegistryUnavailableError, format_layer_range
from swarm.protocol import PeerInfo
from swarm.routing import describe_models
from swarm.transport import Credentials


async def swarm_status(registries: list[str], credentials: Credentials, model: str | None = None) -> dict[str, object]:
    peers = await fetch_peers(registries, model, credentials)
    return {"models": describe_models(peers), "peers": [peer.model_dump() for peer in peers]}


def is_ready(status: dict[str, object], model: str | None) -> bool:
    """Every layer of `model` (or of every model, and at least one) has an online peer."""
    wanted = [m for m in status["models"] if model is None or m["name"] == model]  # type: ignore[union-attr]
    return bool(wanted) and all(m["usable"] for m in wanted)


async def wait_ready(
    registries: list[str], credentials: Credentials, model: str | None, timeout: float
) -> dict[str, object]:
    """Poll until ready or `timeout`; returns the last status seen (raises TimeoutError if never ready)."""
    deadline = time.monotonic() + timeout
    status: dict[str, object] = {"models": [], "peers": []}
    while True:
        try:
            status = await swarm_status(registries, credentials, model)
            if is_ready(status, model):
                return status
        except RegistryUnavailableError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(status)
        await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))


def render_status(status: dict[str, object], console: Console) -> None:
    """Every string here comes from peers, so each is escaped: a model named `[/bold]` is text, not markup."""
    models = status["models"]
    peers = [PeerInfo(**peer) for peer in status["peers"]]  # type: ignore[union-attr]
    if not models:
        console.print("No model is served right now.")
    for model in models:  # type: ignore[union-attr]
        state = "[green]ready[/green]" if model["usable"] else "[red]incomplete[/red]"
        console.print(
            f"[bold]{escape(model['name'])}[/bold]: {model['num_layers']} layers, {model['peers']} peer(s), {state}"
        )
        console.print("  coverage " + "".join(_coverage_glyph(count) for count in model["coverage"]))
        if model["missing"]:
            gaps = ", ".join(format_layer_range(a, b) for a, b in model["missing"])
            console.print(f"  [red]no peer serves layers {gaps}[/red]")
        table = Table("address", "layers", "state", "dtype", "speed", "sessions", "free cache", box=None)
        for peer in sorted((p for p in peers if p.model == model["name"]), key=lambda p: (p.start, p.end)):
            table.add_row(
                escape(peer.address),
                format_layer_range(peer.start, peer.end),
                escape(peer.state),
                escape(peer.dtype),
                f"{peer.throughput:.0f}/s",
                str(peer.sessions),
                str(peer.cache_tokens_free),
            )
        console.print(table)


def _coverage_glyph(count: int) -> str:
    return "[red]·[/red]" if count == 0 else ("[yellow]1[/yellow]" if count == 1 else f"[green]{min(count, 9)}[/green]")


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    from swarm.client.core.loop import EventLoopThread

    registries, credentials = settings.registry, settings.credentials()
    runner = EventLoopThread()
    try:
        if args.wait_ready is not None:
            try:
                status = runner.run(wait_ready(registries, credentials, args.served_model, args.wait_ready))
            except TimeoutError as exc:
                status = exc.args[0] if exc.args else {"models": [], "peers": []}
                _print_status(status, args.json)
                what = f"model {args.served_model!r}" if args.served_model else "every model"
                print(f"swarm-client: {what} not fully served after {args.wait_ready:g} s", file=sys.stderr)
                return 1
        else:
            status = runner.run(swarm_status(registries, credentials, args.served_model))
    finally:
        runner.close()
    _print_status(status, args.json)
    return 0


def _print_status(status: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        render_status(status, Console())
