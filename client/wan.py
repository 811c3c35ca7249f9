"""A wide-area network on one machine: a delaying TCP proxy in front of each peer.

Tests and benchmarks run whole swarms on loopback, where a round trip costs microseconds; a swarm lives on home
links where it costs tens of milliseconds. `WanProxy` listens on 127.0.0.1 in front of one peer's address and
forwards bytes both ways, each direction through a model of that peer's access link (`Link`):

- delay: every chunk arrives half the profile's round trip after it was sent, plus jitter, a uniform 0..jitter_ms
  drawn per chunk. `rtt_ms` is thus the floor of the round trip (queues only ever add delay). Jitter never
  reorders: a chunk is delivered at max(previous delivery on its connection, its own arrival), as TCP would.
- bandwidth: a chunk of n bytes holds the link for n / rate seconds, and the chunks of all connections to the peer
  take their turns, so a bulk transfer takes at least bytes / rate.
- loss, as TCP sees it: TCP retransmits, so a lost segment is not missing bytes but a late chunk. Each ~1448-byte
  segment of a chunk is lost with probability `loss`; a chunk that lost any arrives one round trip later (fast
  retransmit: duplicate acks tell the sender within a round trip, and the resent segment takes the one-way trip
  again), holding back the chunks behind it. Retransmission timeouts and congestion-window cuts are not modelled.
- connecting: a proxied connection's first bytes arrive no earlier than a TCP handshake allows (one round trip
  before the first one-way trip), and a refused connection is closed only after a round trip.

Why a proxy and not `tc qdisc ... netem`: the kernels these tests run on lack netem (`Specified qdisc kind is
unknown`), and a proxy needs no privileges, touches no other process's traffic, and counts the bytes each peer
sends and receives (`bytes_up`, `bytes_down`).

Each proxy runs its own event loop in its own thread, so synchronous code (tests, `LocalSwarm`) starts and closes
it like any object:

    with WanProxy(upstream_port=7000, profile=PROFILES["home"]) as proxy:
        connect_to(proxy.address())   # ws://127.0.0.1:<port>, 60 ms away from port 7000
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from swarm.runtime import new_event_loop

SEGMENT_BYTES = 1448
"""TCP payload per segment on a 1500-byte Ethernet path: the unit that gets lost."""
CHUNK_BYTES = 64 * 1024
"""Most bytes read (and so delayed, charged and delivered) as one chunk."""
CHUNKS_IN_FLIGHT = 64
"""Chunks one direction of one connection holds before it stops reading, leaving the rest to the sockets' own
buffers (and so slowing the sender, as a full TCP window would)."""
CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class WanProfile:
    """One access link: `rtt_ms` the least round trip, `jitter_ms` the most each direction adds to it,
    `rate_mbit` its bandwidth each way (None: unlimited), `loss` the chance a TCP segment is lost."""

    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_mbit: float | None = None
    loss: float = 0.0

    @property
    def rtt(self) -> float:
        return self.rtt_ms / 1000

    @property
    def one_way(self) -> float:
        return self.rtt / 2

    def transmit_seconds(self, size: int) -> float:
        return size * 8 / (self.rate_mbit * 1e6) if self.rate_mbit else 0.0


PROFILES: Mapping[str, WanProfile] = MappingProxyType(
    {
        "none": WanProfile(),
        "lan": WanProfile(rtt_ms=1.0, jitter_ms=0.1),
        "metro": WanProfile(rtt_ms=20.0, jitter_ms=1.0, rate_mbit=1000.0),
        "home": WanProfile(rtt_ms=60.0, jitter_ms=2.0, rate_mbit=50.0, loss=0.005),
    }
)
MIXED_FROM = ("lan", "metro", "home")
"""The profiles `mixed` draws each peer's from, so a swarm has near and far peers."""
WAN_NAMES = (*PROFILES, "mixed")


def resolve_profile(wan: str | WanProfile, peer: str = "", seed: int = 0) -> WanProfile:
    """The profile of `peer`'s link: `wan` itself, the profile it names, or with `mixed` one drawn from
    `MIXED_FROM` by `seed` and the peer's name (the same peer gets the same profile on every run)."""
    if isinstance(wan, WanProfile):
        return wan
    if wan == "mixed":
        return PROFILES[random.Random(f"{seed}:{peer}").choice(MIXED_FROM)]
    if wan not in PROFILES:
        raise ValueError(f"unknown WAN profile {wan!r}; choose one of {', '.join(WAN_NAMES)} or pass a WanProfile")
    return PROFILES[wan]


@dataclass
class Link:
    """One direction of a peer's access link, shared by all its connections: when a chunk sent at `now` arrives.
    Plain arithmetic over a seeded random generator; no I/O."""

    profile: WanProfile
    rng: random.Random
    free_at: float = 0.0
    """When the link has finished putting the chunks it was given on the wire."""

    def arrival(self, now: float, size: int) -> float:
        self.free_at = max(now, self.free_at) + self.profile.transmit_seconds(size)
        delay = self.profile.one_way + self.rng.uniform(0.0, self.profile.jitter_ms / 1000)
        if self.profile.loss and self.rng.random() < 1 - (1 - self.profile.loss) ** math.ceil(size / SEGMENT_BYTES):
            delay += self.profile.rtt
        return self.free_at + delay


@dataclass
class Stream:
    """One direction of one connection over a `Link`: deliveries in the order the bytes were sent."""

    link: Link
    delivered_at: float

    def schedule(self, now: float, size: int) -> float:
        self.delivered_at = max(self.delivered_at, self.link.arrival(now, size))
        return self.delivered_at

    def schedule_eof(self, now: float) -> float:
        """A half-close (FIN) travels like a byte, behind everything sent before it."""
        self.delivered_at = max(self.delivered_at, now + self.link.profile.one_way)
        return self.delivered_at


@dataclass
class WanProxy:
    """Listens on 127.0.0.1:`port` (0: any free port) and forwards to `upstream_host:upstream_port` through
    `profile`'s link; `start()` it (or use it as a context manager), `close()` it when done.

    `bytes_up` counts bytes delivered to the upstream peer, `bytes_down` bytes delivered from it, and
    `connections` the connections accepted; read them from any thread."""

    upstream_port: int
    profile: WanProfile = field(default_factory=WanProfile)
    port: int = 0
    upstream_host: str = "127.0.0.1"
    seed: int = 0
    name: str = ""
    bytes_up: int = field(default=0, init=False)
    bytes_down: int = field(default=0, init=False)
    connections: int = field(default=0, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _server: asyncio.AbstractServer | None = field(default=None, init=False, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self._up = Link(self.profile, random.Random(rng.random()))
        self._down = Link(self.profile, random.Random(rng.random()))

    def address(self, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> WanProxy:
        """Listen, in a thread of its own; returns once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("this WanProxy was started already")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name=f"wan-proxy-{self.name}")
        self._thread.daemon = True  # a proxy left open must not keep the interpreter alive
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def close(self) -> None:
        """Stop listening, drop every connection, stop the thread; the proxy cannot be started again."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(CLOSE_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_TIMEOUT)

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = new_event_loop()
        try:
            try:
                self._server = loop.run_until_complete(self._listen())
                self._loop = loop
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def __enter__(self) -> WanProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _listen(self) -> asyncio.AbstractServer:
        server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports finish closing

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        accepted = time.monotonic()
        upstream_writer: asyncio.StreamWriter | None = None
        clean = False
        try:
            _no_delay(client_writer)
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except OSError:
                await _sleep_until(accepted + self.profile.rtt)  # the refusal comes back a round trip later
                return
            _no_delay(upstream_writer)
            up = Stream(self._up, accepted + self.profile.rtt)  # the handshake's round trip comes first
            down = Stream(self._down, accepted + self.profile.one_way)
            up_queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(CHUNKS_IN_FLIGHT)
            down_queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(CHUNKS_IN_FLIGHT)
            async with asyncio.TaskGroup() as group:  # a failure anywhere cancels all four
                group.create_task(_read(client_reader, up, up_queue))
                group.create_task(self._deliver(up_queue, upstream_writer, up=True))
                group.create_task(_read(upstream_reader, down, down_queue))
                group.create_task(self._deliver(down_queue, client_writer, up=False))
            clean = True
        except* (OSError, RuntimeError):  # RuntimeError: uvloop's word for a write to a transport closed under us
            pass  # one side reset or vanished: the other side is reset too, below
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    _close(writer, clean)

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter, up: bool) -> None:
        """Hand each chunk to the other side when the link says it arrives; end with the half-close."""
        while True:
            at, chunk = await queue.get()
            await _sleep_until(at)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            if up:
                self.bytes_up += len(chunk)
            else:
                self.bytes_down += len(chunk)
            await writer.drain()


async def _read(reader: asyncio.StreamReader, stream: Stream, queue: asyncio.Queue[tuple[float, bytes]]) -> None:
    """Read one side as fast as it sends (up to `CHUNKS_IN_FLIGHT` chunks ahead), stamping each chunk's delivery."""
    while chunk := await reader.read(CHUNK_BYTES):
        await queue.put((stream.schedule(time.monotonic(), len(chunk)), chunk))
    await queue.put((stream.schedule_eof(time.monotonic()), b""))


async def _sleep_until(deadline: float) -> None:
    """Wake at `deadline`, never before, and at most about a millisecond after: event loop timers count whole
    milliseconds (uvloop rounds), so a wake-up that came early sleeps another millisecond. Never spinning: the
    proxies share the GIL with the process they run in (a benchmark's client), and a thread spinning through the
    last fraction of a millisecond holds every other thread off for up to the interpreter's switch interval."""
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(max(left, 0.001))


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close(writer: asyncio.StreamWriter, clean: bool) -> None:
    """Close after a clean end; otherwise reset, so the peer sees the failure the other side saw."""
    if clean:
        writer.close()
    else:
        writer.transport.abort()
