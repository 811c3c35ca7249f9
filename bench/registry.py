"""A registry under a swarm's load: simulated peers heartbeating over the real protocol, clients planning routes.

Starts `--registries` registries (`swarm-registry`, as a user starts them), then `--peers` simulated peers in
`--peer-processes` processes: each peer opens its own connection to every registry with the project's transport
(`open_connection`: hello, welcome) and announces a random span of one of `--models` models every
`--heartbeat` seconds, reconnecting with the node's backoff when a registry goes away. `--clients` processes
then make the client's own route query, `ChainPlanner.plan` (the registry query and the planning), `--qps`
times a second in all, open loop, spread over the registries. Measured after every peer has announced and one
heartbeat period has passed:

- ping floor p50 / p99: a websocket ping from the same client processes to registry 0, sent with each query:
  what any round trip between these processes costs on this machine now, the baseline of the route figures;
- route query p50 / p99: `ChainPlanner.plan` end to end on loopback (query, decode, plan; each client process
  keeps its connections to the registries open between queries, as a client's planner does, and opens one
  more when its queries overlap);
- heartbeat ack p99: announce sent -> ack received, every peer;
- reply size: the median `swarm_view` frame a route query got;
- registry RSS (and its peak) and CPU, from /proc;
- wrong expiries: peers missing from a registry's live count (`/api/v1/state`, sampled every 2 s) while every
  peer is heartbeating; none should ever be;
- with several registries, how often the chains they give at the same moment agree;
- with `--restart`, registry 0 is stopped mid-run and started again: how long until it knows every peer again.

    python bench/registry.py --peers 100,1000,10000
    python bench/registry.py --peers 10000 --qps 50 --registries 2 --restart
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository first, not bench/ (see bench/__init__.py)

from swarm.runtime import quiet_optional_backends

quiet_optional_backends()  # before transformers imports torchao, which logs what this machine cannot load

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import websockets
from rich.console import Console
from rich.table import Table

from bench.common import cpu_seconds, median, write_json
from swarm.client.local_swarm import LocalSwarm, Process, wait_for_port
from swarm.errors import SwarmError
from swarm.protocol import Ack, Announce, PeerInfo
from swarm.runtime import run
from swarm.transport import Credentials, open_connection, request

TARGETS = {"route_p99_ms": 5.0, "heartbeat_p99_ms": 20.0, "rss_mib": 150.0, "wrong_expiries": 0}
"""What issue 20 asks of a registry at 10,000 peers heartbeating every 5 s and 50 route queries a second."""
CACHE_TOKENS_NEEDED = 2048
"""What a route query asks of each peer's free cache: one session of 2048 tokens."""
MAX_IN_FLIGHT = 64
"""Route queries one client process keeps open at once; a query due beyond it is counted as skipped."""


@dataclass(frozen=True)
class Run:
    peers: int
    heartbeat: float
    qps: float
    models: int
    num_layers: int
    registries: list[str]
    peer_processes: int
    clients: int
    seconds: float
    restart: bool


@dataclass
class Samples:
    """What one worker measured: (when, milliseconds) pairs, so the parent keeps only the measured window."""

    latencies: list[tuple[float, float]] = field(default_factory=list)
    pings: list[tuple[float, float]] = field(default_factory=list)
    failures: list[float] = field(default_factory=list)
    reply_bytes: list[int] = field(default_factory=list)
    agreements: list[bool] = field(default_factory=list)
    skipped: int = 0


def sim_peer_info(index: int, run_: Run) -> PeerInfo:
    """Peer `index`: a span of 1 to a quarter of the layers (so chains take a few hops), a throughput around
    what a GPU does, and free cache for a few sessions (every tenth peer full, so cache matters to routes)."""
    rng = random.Random(index)
    length = rng.randint(1, max(1, run_.num_layers // 4))
    start = rng.randrange(run_.num_layers - length + 1)
    return PeerInfo(
        peer_id=f"sim-{index:06d}",
        address=f"ws://127.0.0.1:{20000 + index % 40000}",
        model=f"bench-model-{index % run_.models}",
        num_layers=run_.num_layers,
        start=start,
        end=start + length,
        state="online",
        dtype="bfloat16",
        throughput=rng.uniform(200.0, 2000.0),
        cache_tokens_free=0 if index % 10 == 0 else 16384,
        cache_tokens_total=16384,
        version="bench",
        codecs=["raw", "int8-block"],
    )


async def heartbeat(url: str, info: PeerInfo, run_: Run, samples: Samples, joined: asyncio.Event) -> None:
    """One peer's link to one registry, like `swarm.node.announcer.Announcer`: announce, wait a period, again;
    reconnect with backoff when the registry goes away."""
    message = Announce(peer=info, ttl=run_.heartbeat * 3)
    backoff = 0.5
    while True:
        try:
            connection, _ = await open_connection(url, agent="swarm-bench-peer")
            backoff = 0.5
            async with connection:
                while True:
                    began = time.monotonic()
                    await request(connection, message, Ack, timeout=run_.heartbeat * 2, peer=url)
                    done = time.monotonic()
                    samples.latencies.append((began, (done - began) * 1000))
                    if not joined.is_set():
                        joined.set()
                        await asyncio.sleep(random.uniform(0, run_.heartbeat))  # spread the peers' phases
                    await asyncio.sleep(max(0.0, run_.heartbeat - (time.monotonic() - began)))
        except (SwarmError, OSError):
            samples.failures.append(time.monotonic())
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, run_.heartbeat)


def peer_worker(run_: Run, indices: range, ready: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    async def main() -> Samples:
        samples = Samples()
        connecting = asyncio.Semaphore(64)  # a node fleet does not start in one instant either
        tasks: list[asyncio.Task[None]] = []

        async def join(info: PeerInfo, url: str) -> None:
            joined = asyncio.Event()
            async with connecting:
                tasks.append(asyncio.create_task(heartbeat(url, info, run_, samples, joined)))
                await joined.wait()

        infos = [sim_peer_info(index, run_) for index in indices]
        await asyncio.gather(*(join(info, url) for info in infos for url in run_.registries))
        ready.put(("ready", len(tasks)))
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return samples

    ready.put(("peer", run(main())))


def client_worker(run_: Run, rank: int, results: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    """Route queries at `qps / clients` a second, open loop, each as a client makes it (`ChainPlanner.plan`)."""
    import swarm.transport
    from swarm.client.core.planner import ChainPlanner
    from swarm.registry.client import RegistryPool

    samples = Samples()
    decode = swarm.transport.decode_message

    def measured_decode(frame: bytes | str, max_bytes: int | None = None) -> object:
        message = decode(frame, max_bytes)
        if getattr(message, "type", "") == "swarm_view":
            samples.reply_bytes.append(len(frame))
        return message

    swarm.transport.decode_message = measured_decode  # only to count reply bytes; nothing else changes
    models = [f"bench-model-{m}" for m in range(run_.models)]

    pool = RegistryPool(Credentials())

    def planner(registries: list[str], model: str) -> ChainPlanner:
        """A planner of its own per query (one planner shares a query among concurrent callers), over the
        process's connections to the registries, as one client's planner keeps them between its queries."""
        return ChainPlanner(registries=registries, model_name=model, num_layers=run_.num_layers, registry_pool=pool)

    async def one(first: int, model: str) -> None:
        """A client that knows every registry and asks registry `first` first."""
        registries = run_.registries[first:] + run_.registries[:first]
        began = time.monotonic()
        try:
            await planner(registries, model).plan(cache_tokens_needed=CACHE_TOKENS_NEEDED)
            samples.latencies.append((began, (time.monotonic() - began) * 1000))
        except SwarmError:
            samples.failures.append(began)

    async def agree() -> None:
        """Every registry's chain for the same model, asked at the same moment."""
        model = random.choice(models)
        chains = await asyncio.gather(
            *(planner([url], model).plan(cache_tokens_needed=CACHE_TOKENS_NEEDED) for url in run_.registries),
            return_exceptions=True,
        )
        keys = [
            None if isinstance(chain, BaseException) else [(link.peer.peer_id, link.start, link.end) for link in chain]
            for chain in chains
        ]
        samples.agreements.append(all(key is not None and key == keys[0] for key in keys))

    async def ping(connection: websockets.asyncio.client.ClientConnection) -> None:
        """The floor beside each query: a websocket ping to the registry, answered by its transport alone."""
        began = time.monotonic()
        try:
            await asyncio.wait_for(await connection.ping(), timeout=5)
            samples.pings.append((began, (time.monotonic() - began) * 1000))
        except (TimeoutError, websockets.ConnectionClosed):
            pass

    async def main() -> Samples:
        floor, _ = await open_connection(run_.registries[0], agent="swarm-bench-floor")
        results.put(("ready", 0))
        rate = run_.qps / run_.clients
        rng = random.Random(rank)
        in_flight: set[asyncio.Task[None]] = set()
        due = time.monotonic() + rng.uniform(0, 1 / rate)
        next_check = time.monotonic() + 1.0
        turn = rank
        while not stop.is_set():
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due += 1 / rate
            turn += 1
            if len(in_flight) >= MAX_IN_FLIGHT:
                samples.skipped += 1
                continue
            for task in (
                asyncio.create_task(one(turn % len(run_.registries), models[turn % len(models)])),
                asyncio.create_task(ping(floor)),
            ):
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if len(run_.registries) > 1 and time.monotonic() >= next_check:
                next_check += 1.0
                check = asyncio.create_task(agree())
                in_flight.add(check)
                check.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight, return_exceptions=True)
        return samples

    results.put(("client", run(main())))


def live_counts(url: str) -> dict[str, int]:
    """Live peers per model, as a registry's dashboard data counts them."""
    http = url.replace("ws://", "http://") + "/api/v1/state"
    state = json.loads(urllib.request.urlopen(http, timeout=30).read())
    return {model["name"]: int(model["peers"]) for model in state["models"]}


def expected_counts(run_: Run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for index in range(run_.peers):
        model = f"bench-model-{index % run_.models}"
        counts[model] = counts.get(model, 0) + 1
    return counts


def memory_mib(pid: int) -> tuple[float, float]:
    """(RSS now, peak RSS) of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(run_: Run, swarm: LocalSwarm, registries: list[Process]) -> dict[str, object]:
    context = multiprocessing.get_context("fork")
    ready, stop = context.Queue(), context.Event()
    shares = [range(p, run_.peers, run_.peer_processes) for p in range(run_.peer_processes)]
    workers = [context.Process(target=peer_worker, args=(run_, share, ready, stop), daemon=True) for share in shares]
    began = time.monotonic()
    for worker in workers:
        worker.start()
    for _ in workers:
        kind, _count = ready.get(timeout=600)
        assert kind == "ready"
    joined_s = time.monotonic() - began
    print(f"{run_.peers} peers announced to {len(registries)} registries in {joined_s:.1f} s", file=sys.stderr)
    clients = [
        context.Process(target=client_worker, args=(run_, rank, ready, stop), daemon=True)
        for rank in range(run_.clients)
    ]
    for client in clients:
        client.start()
    for _ in clients:
        kind, _count = ready.get(timeout=600)
        assert kind == "ready"
    time.sleep(run_.heartbeat)  # one heartbeat period, the peers' phases spread
    window_start, load_before = time.monotonic(), os.getloadavg()[0]
    cpu_start = [cpu_seconds(process.popen.pid) for process in registries]
    expected, missing, restart_s, dashboard_failures = expected_counts(run_), [], None, 0
    while time.monotonic() < window_start + run_.seconds:
        if run_.restart and restart_s is None and time.monotonic() >= window_start + run_.seconds / 3:
            restart_s = restart_and_wait(run_, swarm, registries, expected)
            continue
        for process in registries:
            try:
                counts = live_counts(process.address)
            except OSError:  # the dashboard did not answer: counted, and the row says so
                dashboard_failures += 1
                continue
            missing.append(sum(max(0, n - counts.get(model, 0)) for model, n in expected.items()))
        time.sleep(2.0)
    window_end = time.monotonic()
    cpu = [
        (cpu_seconds(p.popen.pid) - c) / (window_end - window_start) for p, c in zip(registries, cpu_start, strict=True)
    ]
    rss, peak = zip(*(memory_mib(process.popen.pid) for process in registries), strict=True)
    stop.set()
    gathered = [ready.get(timeout=120) for _ in workers + clients]
    for process in workers + clients:
        process.join(timeout=30)
    peer_samples = [samples for kind, samples in gathered if kind == "peer"]
    client_samples = [samples for kind, samples in gathered if kind == "client"]

    def in_window(samples: list[Samples], attribute: str) -> list[float]:
        return [ms for s in samples for when, ms in getattr(s, attribute) if window_start <= when < window_end]

    heartbeats, routes = in_window(peer_samples, "latencies"), in_window(client_samples, "latencies")
    pings = in_window(client_samples, "pings")
    agreements = [agree for s in client_samples for agree in s.agreements]
    return {
        "peers": run_.peers,
        "registries": len(registries),
        "heartbeat_s": run_.heartbeat,
        "qps": run_.qps,
        "models": run_.models,
        "num_layers": run_.num_layers,
        "seconds": window_end - window_start,
        "join_s": joined_s,
        "ping_floor_p50_ms": percentile(pings, 50),
        "ping_floor_p99_ms": percentile(pings, 99),
        "route_queries": len(routes),
        "route_p50_ms": percentile(routes, 50),
        "route_p99_ms": percentile(routes, 99),
        "route_failures": sum(1 for s in client_samples for t in s.failures if window_start <= t < window_end),
        "route_skipped": sum(s.skipped for s in client_samples),
        "reply_bytes_median": median([float(n) for s in client_samples for n in s.reply_bytes]),
        "heartbeats": len(heartbeats),
        "heartbeat_p50_ms": percentile(heartbeats, 50),
        "heartbeat_p99_ms": percentile(heartbeats, 99),
        "heartbeat_failures": sum(1 for s in peer_samples for t in s.failures if window_start <= t < window_end),
        "registry_rss_mib": max(rss),
        "registry_peak_rss_mib": max(peak),
        "registry_cpu": max(cpu),
        "wrong_expiries": max(missing, default=0),
        "dashboard_failures": dashboard_failures,
        "chains_agree": statistics.fmean(agreements) if agreements else None,
        "restart_relearn_s": restart_s,
        "load_average": [load_before, os.getloadavg()[0]],  # other work on the machine skews every figure
    }


def restart_and_wait(run_: Run, swarm: LocalSwarm, registries: list[Process], expected: dict[str, int]) -> float:
    """Stop registry 0, start it again on its port, and time how long until it counts every peer again."""
    registries[0].kill()
    registries[0] = swarm.restart(registries[0])
    wait_for_port(int(registries[0].address.rsplit(":", 1)[1]), registries[0])
    began = time.monotonic()
    while True:
        try:
            if live_counts(registries[0].address) == expected:
                relearn = time.monotonic() - began
                print(f"restarted registry knows every peer again after {relearn:.1f} s", file=sys.stderr)
                return relearn
        except OSError:
            pass
        if time.monotonic() - began > 300:
            raise RuntimeError("the restarted registry did not relearn the swarm within 300 s")
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="100,1000,10000", help="comma-separated peer counts, one row each")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between a peer's announces")
    parser.add_argument("--qps", type=float, default=50.0, help="route queries per second, all clients together")
    parser.add_argument("--models", type=int, default=1, help="models the peers serve (peers spread evenly)")
    parser.add_argument("--layers", type=int, default=32, help="layers of each model")
    parser.add_argument("--registries", type=int, default=1, help="registries every peer announces to")
    parser.add_argument("--clients", type=int, default=4, help="client processes sharing --qps")
    parser.add_argument("--peer-processes", type=int, default=4, help="processes the simulated peers run in")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per row")
    parser.add_argument("--restart", action="store_true", help="restart registry 0 a third into the window")
    parser.add_argument("--label", default="", help="added to the JSON file's name (e.g. before, after)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a connection per peer; children inherit it
    rows = []
    for peers in (int(count) for count in args.peers.split(",")):
        with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir), threads=None) as swarm:
            ports = [swarm.registry_port] + [swarm.new_port() for _ in range(args.registries - 1)]
            registries = [
                swarm.start_registry("--max-peers", str(2 * peers + 100), "--log-level", "WARNING", port=port)
                for port in ports
            ]
            run_ = Run(
                peers=peers,
                heartbeat=args.heartbeat,
                qps=args.qps,
                models=args.models,
                num_layers=args.layers,
                registries=[process.address for process in registries],
                peer_processes=min(args.peer_processes, peers),
                clients=args.clients,
                seconds=args.seconds,
                restart=args.restart,
            )
            rows.append(measure(run_, swarm, registries))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print_table(rows, args)
    name = "registry" + (f"-{args.label}" if args.label else "")
    out = args.json or Path(__file__).parent / "results" / f"{name}.json"
    payload = {"benchmark": "registry", "targets": TARGETS, "cpus": os.cpu_count(), "rows": rows}
    write_json(out, payload | {"load_average_after": os.getloadavg()})
    print(f"wrote {out}")
    return 0


def print_table(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    title = (
        f"registry: heartbeat every {args.heartbeat:g} s, {args.qps:g} route queries/s from {args.clients} clients, "
        f"{args.models} model(s) of {args.layers} layers, {args.registries} registry(ies)"
    )
    table = Table(title=title)
    columns = ["peers", "ping floor p50 / p99 (ms)", "route query p50 / p99 (ms)", "route p99 / floor p99"]
    columns += ["heartbeat ack p99 (ms)", "reply (KiB)", "registry RSS (MiB)"]
    columns += ["registry CPU", "wrong expiries", "failed / skipped"]
    if args.registries > 1:
        columns.append("chains agree")
    if args.restart:
        columns.append("restart: relearned in (s)")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        cells = [
            f"{row['peers']:,}",
            f"{row['ping_floor_p50_ms']:.1f} / {row['ping_floor_p99_ms']:.1f}",
            f"{row['route_p50_ms']:.1f} / {row['route_p99_ms']:.1f}",
            f"{row['route_p99_ms'] / row['ping_floor_p99_ms']:.1f}",
            f"{row['heartbeat_p99_ms']:.1f}",
            f"{row['reply_bytes_median'] / 1024:.1f}",
            f"{row['registry_rss_mib']:.0f} (peak {row['registry_peak_rss_mib']:.0f})",
            f"{row['registry_cpu']:.0%}",
            str(row["wrong_expiries"])
            + (f" ({row['dashboard_failures']} unanswered)" if row["dashboard_failures"] else ""),
            f"{row['route_failures']} / {row['route_skipped']}",
        ]
        if args.registries > 1:
            cells.append("-" if row["chains_agree"] is None else f"{row['chains_agree']:.0%}")
        if args.restart:
            cells.append("-" if row["restart_relearn_s"] is None else f"{row['restart_relearn_s']:.1f}")
        table.add_row(*cells)
    Console(width=200).print(table)
    target = ", ".join(f"{key} {value}" for key, value in TARGETS.items())
    print(f"targets at 10,000 peers, 5 s heartbeat, 50 queries/s: {target}")


if __name__ == "__main__":
    sys.exit(main())
