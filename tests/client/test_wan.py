"""The simulated WAN: the link model as arithmetic, then the proxy measured through an echo server of its own."""

from __future__ import annotations

import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.client.local_swarm import LocalSwarm
from swarm.client.wan import MIXED_FROM, PROFILES, Link, Stream, WanProfile, WanProxy, resolve_profile

ECHO = """
import socket, threading
server = socket.create_server(("127.0.0.1", 0), backlog=128)
print(server.getsockname()[1], flush=True)
def echo(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()
"""


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """An echo server in a process of its own, so that it never waits for this one's GIL."""
    process = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


def connect(proxy: WanProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def round_trips(proxy: WanProxy, count: int) -> list[float]:
    """Seconds each of `count` small messages took to come back, on one warmed-up connection."""
    with connect(proxy) as sock:
        sock.sendall(b"warm")
        assert receive(sock, 4) == b"warm"
        times = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"ping")
            assert receive(sock, 4) == b"ping"
            times.append(time.perf_counter() - start)
    return times


def echo_through(proxy: WanProxy, payload: bytes, pieces: random.Random | None = None) -> bytes:
    """Send `payload` (in random-size pieces with `pieces`) while reading its echo; returns what came back."""
    with connect(proxy) as sock:

        def send() -> None:
            offset = 0
            while offset < len(payload):
                size = pieces.randrange(1, 20_000) if pieces else len(payload)
                sock.sendall(payload[offset : offset + size])
                offset += size

        sender = threading.Thread(target=send)
        sender.start()
        echoed = receive(sock, len(payload))
        sender.join()
    return echoed


# The link model, no sockets


def test_a_chunk_arrives_no_sooner_than_half_the_round_trip_and_no_later_than_the_jitter_allows() -> None:
    profile = WanProfile(rtt_ms=40, jitter_ms=4)
    link = Link(profile, random.Random(1))
    delays = [link.arrival(now, 100) - now for now in range(1000)]
    assert min(delays) >= 0.020 - 1e-9
    assert max(delays) <= 0.024 + 1e-9
    assert max(delays) - min(delays) > 0.003  # the jitter is real


def test_jitter_never_reorders_the_chunks_of_a_stream() -> None:
    stream = Stream(Link(WanProfile(rtt_ms=2, jitter_ms=50), random.Random(2)), delivered_at=0.0)
    deliveries = [stream.schedule(i * 0.001, 10) for i in range(500)]
    assert deliveries == sorted(deliveries)
    assert stream.schedule_eof(0.5) >= deliveries[-1]


def test_the_bandwidth_limit_serializes_chunks_of_all_connections() -> None:
    link = Link(WanProfile(rtt_ms=10, rate_mbit=8), random.Random(3))  # 1 byte per microsecond
    first, second = Stream(link, 0.0), Stream(link, 0.0)
    arrivals = [stream.schedule(0.0, 10_000) for stream in (first, second, first, second)]
    assert arrivals == pytest.approx([0.015, 0.025, 0.035, 0.045])


def test_a_lost_segment_costs_one_round_trip_as_often_as_the_loss_rate_says() -> None:
    link = Link(WanProfile(rtt_ms=10, loss=0.05), random.Random(4))
    delays = [link.arrival(float(now), 1000) - now for now in range(4000)]
    late = [delay for delay in delays if delay > 0.006]
    assert {round(delay, 9) for delay in delays} == {0.005, 0.015}
    assert 0.035 < len(late) / len(delays) < 0.065
    big = Link(WanProfile(rtt_ms=10, loss=0.05), random.Random(4))  # 14 segments: most big chunks lose one
    assert sum(big.arrival(float(now), 20_000) - now > 0.006 for now in range(1000)) > 400


def test_mixed_gives_each_peer_a_profile_of_its_own_the_same_on_every_run() -> None:
    peers = [f"node-{i}" for i in range(30)]
    drawn = [resolve_profile("mixed", peer, seed=5) for peer in peers]
    assert drawn == [resolve_profile("mixed", peer, seed=5) for peer in peers]
    assert set(drawn) == {PROFILES[name] for name in MIXED_FROM}
    assert drawn != [resolve_profile("mixed", peer, seed=6) for peer in peers]
    assert resolve_profile("home") == PROFILES["home"] == WanProfile(60, 2, 50, 0.005)
    with pytest.raises(ValueError, match="unknown WAN profile 'moon'"):
        resolve_profile("moon")


# The proxy, measured


@pytest.mark.parametrize("name", ["lan", "metro", "home"])
def test_small_messages_take_the_profiles_round_trip(name: str, echo_port: int) -> None:
    profile = PROFILES[name]
    with WanProxy(echo_port, profile, seed=7, name=name) as proxy:
        times = round_trips(proxy, 15 if name == "home" else 30)
    median = statistics.median(times)
    print(f"\n{name}: round trip median {median * 1000:.2f} ms (profile {profile.rtt_ms} ms)")
    assert min(times) >= profile.rtt  # the proxy never delivers early
    assert median <= profile.rtt + 2 * profile.jitter_ms / 1000 + 0.025  # loose: a busy 2-core machine


def test_a_bulk_transfer_takes_at_least_bytes_over_rate_and_not_much_more(echo_port: int) -> None:
    profile = WanProfile(rtt_ms=4, rate_mbit=40)
    payload = random.Random(8).randbytes(1_000_000)  # 0.2 s each way at 40 Mbit/s; both ways overlap
    with WanProxy(echo_port, profile) as proxy:
        start = time.perf_counter()
        assert echo_through(proxy, payload) == payload
        elapsed = time.perf_counter() - start
    print(f"\n1 MB echoed at 40 Mbit/s in {elapsed:.3f} s (at least {profile.transmit_seconds(len(payload)):.3f} s)")
    assert elapsed >= profile.transmit_seconds(len(payload))
    assert elapsed <= 2.5 * profile.transmit_seconds(len(payload)) + 0.2


def test_bytes_are_never_reordered_or_corrupted_across_concurrent_connections(echo_port: int) -> None:
    profile = WanProfile(rtt_ms=2, jitter_ms=20, rate_mbit=400, loss=0.02)  # jitter 10x the delay: it would reorder
    payloads = [random.Random(seed).randbytes(200_000 + seed) for seed in range(8)]
    echoed: dict[int, bytes] = {}
    with WanProxy(echo_port, profile, seed=9) as proxy:

        def echo(i: int) -> None:
            echoed[i] = echo_through(proxy, payloads[i], random.Random(i))

        threads = [threading.Thread(target=echo, args=(i,)) for i in range(len(payloads))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert proxy.connections == len(payloads)
        assert proxy.bytes_up == proxy.bytes_down == sum(map(len, payloads))
    assert [echoed[i] == payloads[i] for i in range(len(payloads))] == [True] * len(payloads)


def test_loss_shows_up_as_round_trips_of_delay(echo_port: int) -> None:
    """Lower bounds only: a busy machine adds delay to every round trip, never takes the resends' away."""
    profile = WanProfile(rtt_ms=10, loss=0.3)
    with WanProxy(echo_port, profile, seed=10) as proxy:
        times = round_trips(proxy, 40)
    late = sum(t >= 2 * profile.rtt for t in times)  # a ping or its echo was resent: one more round trip
    assert min(times) >= profile.rtt
    assert late >= 10  # each round trip: 1 - 0.7 ** 2 = 51 % chance, fixed by the seed
    assert statistics.mean(times) >= profile.rtt * (1 + 0.5 * 2 * profile.loss)  # half the expected 6 ms


def test_a_half_close_crosses_the_proxy_and_the_answer_still_comes_back(echo_port: int) -> None:
    with WanProxy(echo_port, WanProfile(rtt_ms=10)) as proxy, connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # the echo server closes only once it sees this end of stream
        assert receive(sock, 100) == b"last words"
        assert sock.recv(10) == b""


def test_a_refused_connection_is_closed_a_round_trip_later() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        with WanProxy(unused.getsockname()[1], WanProfile(rtt_ms=50)) as proxy, connect(proxy) as sock:
            start = time.perf_counter()
            try:
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass
            assert time.perf_counter() - start >= 0.045


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_close_drops_every_connection_and_leaves_no_thread_or_socket(echo_port: int) -> None:
    WanProxy(echo_port).start().close()  # the event loop library opens a few files once per process
    threads, files = threading.active_count(), open_files()
    proxy = WanProxy(echo_port, WanProfile(rtt_ms=200, rate_mbit=1)).start()
    clients = [connect(proxy) for _ in range(5)]
    for sock in clients:
        sock.sendall(b"x" * 50_000)  # still in flight, 0.4 s each at 1 Mbit/s, when the proxy closes
    time.sleep(0.05)
    assert threading.active_count() == threads + 1
    proxy.close()
    for sock in clients:
        with sock:
            try:
                assert receive(sock, 100_000) == b""
            except ConnectionResetError:
                pass
    assert threading.active_count() == threads
    assert open_files() == files
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", proxy.port)) != 0
    proxy.close()  # twice is harmless


def test_a_local_swarm_puts_each_node_behind_a_proxy_of_its_own_and_closes_them(tmp_path: Path) -> None:
    """`mixed`: each process its own profile; a node announces its proxy. (A sleeping stand-in for the node.)"""
    threads = threading.active_count()
    stand_in = [sys.executable, "-c", "import time; time.sleep(60)"]
    with LocalSwarm(tmp_path, wan="mixed", wan_seed=3) as swarm:
        nodes = [swarm.start_node("model", f"{i}-{i}", program=stand_in) for i in range(6)]
        metro = swarm.start_node("model", "6-6", program=stand_in, wan="metro")
        assert swarm.registry_url != f"ws://127.0.0.1:{swarm.registry_port}"
        for node in [*nodes, metro]:
            proxy = swarm.proxies[node.name]
            flags = dict(zip(node.args, node.args[1:], strict=False))
            assert node.address == proxy.address() == flags["--public-address"]
            assert flags["--port"] == str(proxy.upstream_port) != str(proxy.port)
        profiles = [swarm.proxies[node.name].profile for node in nodes]
        assert profiles == [resolve_profile("mixed", node.name, 3) for node in nodes] and len(set(profiles)) > 1
        assert swarm.proxies[metro.name].profile == PROFILES["metro"]
        with pytest.raises(ValueError, match="already has a WAN proxy"):
            swarm.start_node("model", "0-0", name=nodes[0].name, program=stand_in)
    assert threading.active_count() == threads
