"""A whole swarm on this machine: a registry and nodes as child processes on loopback.

The demo, the tests and the benchmarks all start swarms through this module. Each node binds 127.0.0.1
only and gets one torch thread, unless `threads=None` starts it as a user would (torch's own choice);
closing the swarm stops every child, also after an error.

With `wan` (a profile name from `swarm.client.wan`, `mixed`, or a `WanProfile`), every registry and node is
reached only through a delaying proxy of its own: a node listens on an internal port and announces the proxy's
address, so clients, nodes and the registry all talk across the simulated WAN.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swarm.client.wan import WanProfile, WanProxy, resolve_profile

READY_TIMEOUT = 120.0


def free_port() -> int:
    """A port free on 127.0.0.1 now, outside the kernel's range for outgoing connections: a port picked there
    can be taken by any client's connection in the moment before the node binds it (`address already in use`)."""
    low, high = _ephemeral_ports()
    for _ in range(1000):
        port = random.randrange(1024, low) if low > 1024 else random.randrange(high + 1, 65536)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port on 127.0.0.1 outside the ephemeral range")


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; other systems use 49152-65535, also above it


def child_env(threads: int | None = 1, **extra: str) -> dict[str, str]:
    """The environment of a child process: offline, unbuffered, and `threads` torch threads (None: whatever
    torch picks, as a user's process would get)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SWARM_")}
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    if threads is not None:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env.update(extra)
    return env


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)
    address: str = ""
    """The URL others use: behind a WAN proxy, the proxy's."""
    stopped_on_purpose: bool = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send a signal the caller means to stop the process with (SIGTERM to drain a node)."""
        self.stopped_on_purpose = True
        self.popen.send_signal(signum)

    def kill(self) -> None:
        self.stopped_on_purpose = True
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=10)


@dataclass
class LocalSwarm:
    """A registry plus any number of nodes; use as a context manager."""

    workdir: Path
    announce_interval: float = 1.0
    threads: int | None = 1
    """Torch threads per child; None starts children as a user would (no thread settings at all)."""
    token: str | None = None
    scheme: str = "ws"
    tls_ca: str | None = None
    registry_port: int = field(default_factory=free_port)
    """The registry's own port; with `wan`, clients and nodes reach it through `registry_url`, its proxy."""
    processes: list[Process] = field(default_factory=list)
    wan: str | WanProfile | None = None
    """Put each registry and node behind a `WanProxy` with this profile (`mixed`: one drawn per process)."""
    wan_seed: int = 0
    """Seeds the proxies' jitter and loss, and which profile `mixed` gives each process."""
    proxies: dict[str, WanProxy] = field(default_factory=dict)
    """The proxy in front of each process, by process name; its `bytes_up`/`bytes_down` count the traffic."""
    _registry_public_port: int = field(default=0, init=False, repr=False)
    _ports: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._ports.add(self.registry_port)
        self._registry_public_port = self.new_port() if self.wan is not None else self.registry_port

    def new_port(self) -> int:
        """A free port this swarm has not handed out before: children start together and bind only once they have
        loaded, so a port picked for one still looks free when the next is picked (`address already in use`)."""
        while (port := free_port()) in self._ports:
            pass
        self._ports.add(port)
        return port

    @property
    def registry_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self._registry_public_port}"

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - the child owns it until it exits
        popen = subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or child_env(self.threads),
            start_new_session=True,
        )
        log_file.close()
        process = Process(name, popen, log_path, args)
        self.processes.append(process)
        return process

    def start_registry(self, *extra: str, port: int | None = None, wan: str | WanProfile | None = None) -> Process:
        """The swarm's registry, or with `port` an additional one (several registries side by side). `wan`
        overrides the swarm's WAN profile for this registry (`registry_url` then names its proxy)."""
        port = port or self.registry_port
        ours = port == self.registry_port
        name = "registry" if ours else f"registry-{port}"
        proxy = self._proxy(name, port, wan, self._registry_public_port if ours and self.wan is not None else 0)
        if ours and proxy is not None:
            self._registry_public_port = proxy.port
        args = [sys.executable, "-m", "swarm.registry.main", "--port", str(port), *extra]
        process = self.spawn(name, args)
        process.address = proxy.address(self.scheme) if proxy else f"{self.scheme}://127.0.0.1:{port}"
        wait_for_port(port, process)
        return process

    def start_node(
        self,
        model: Path | str,
        layers: str,
        *extra: str,
        name: str | None = None,
        program: list[str] | None = None,
        env: dict[str, str] | None = None,
        wan: str | WanProfile | None = None,
    ) -> Process:
        """A node on a free port (so its address is known before it announces). `program` replaces
        `python -m swarm.node.main` (a test double that takes the same flags); `env` adds to its environment;
        `wan` overrides the swarm's WAN profile for this node (behind a proxy, it announces the proxy's address)."""
        port = self.new_port()
        name = name or f"node-{layers}-{len(self.processes)}"
        proxy = self._proxy(name, port, wan)
        address = proxy.address(self.scheme) if proxy else f"{self.scheme}://127.0.0.1:{port}"
        public = ["--public-address", address] if proxy else []
        args = [
            *(program or [sys.executable, "-m", "swarm.node.main"]),
            "--model",
            str(model),
            "--layers",
            layers,
            "--registry",
            self.registry_url,
            *(["--torch-threads", str(self.threads)] if self.threads is not None else []),
            "--no-progress",
            "--announce-interval",
            str(self.announce_interval),
            "--port",
            str(port),
            *public,
            *extra,
        ]
        child = child_env(self.threads, **(env or {}))
        process = self.spawn(name, args, child)
        process.address = address
        return process

    def _proxy(self, name: str, port: int, wan: str | WanProfile | None, public_port: int = 0) -> WanProxy | None:
        """A started proxy in front of `port` for the process `name`, when a WAN applies to it."""
        wan = wan if wan is not None else self.wan
        if wan is None:
            return None
        if name in self.proxies:
            raise ValueError(f"a process named {name!r} already has a WAN proxy; give this one another name")
        profile = resolve_profile(wan, name, self.wan_seed)
        seed = random.Random(f"{self.wan_seed}:{name}").randrange(2**32)
        proxy = WanProxy(port, profile, port=public_port, seed=seed, name=name).start()
        self.proxies[name] = proxy
        return proxy

    def restart(self, process: Process) -> Process:
        """Start a stopped process again with the same arguments (a node comes back), behind the same proxy."""
        process.kill()
        again = self.spawn(process.name + "-again", process.args)
        again.address = process.address
        if process.name in self.proxies:
            self.proxies[again.name] = self.proxies[process.name]
        return again

    def wait_ready(self, model: str | None = None, timeout: float = READY_TIMEOUT) -> None:
        """Block until every layer (of `model`) is served; fail at once, with logs, if a child died."""
        from swarm.client.cli.status import is_ready

        self._wait_until(lambda status: is_ready(status, model), model, timeout)

    def wait_online(self, node: Process, timeout: float = READY_TIMEOUT) -> None:
        """Block until this node itself is announced `online` (a spare is back, not just coverage)."""

        def online(status: dict[str, object]) -> bool:
            peers = status["peers"]
            return any(p["address"] == node.address and p["state"] == "online" for p in peers)  # type: ignore[union-attr]

        self._wait_until(online, None, timeout)

    def _wait_until(self, condition: Callable[[dict[str, object]], bool], model: str | None, timeout: float) -> None:
        import asyncio

        from swarm.client.cli.status import swarm_status
        from swarm.errors import RegistryUnavailableError
        from swarm.transport import Credentials

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.name for p in self.processes if not p.alive() and not p.stopped_on_purpose]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited unexpectedly:\n{self.logs()}")
            try:
                status = asyncio.run(swarm_status([self.registry_url], Credentials(self.token, self.tls_ca), model))
                if condition(status):
                    return
            except RegistryUnavailableError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"swarm not ready after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (alive={p.alive()}) ---\n{p.log()[-3000:]}" for p in self.processes)

    def close(self) -> None:
        """SIGTERM every child (nodes first, so they can leave the registry), then SIGKILL stragglers; then
        close the WAN proxies, which the children needed to say goodbye."""
        for process in reversed(self.processes):
            if process.alive():
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in reversed(self.processes):
            try:
                process.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
        for proxy in self.proxies.values():
            proxy.close()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_port(port: int, process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited early:\n{process.log()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} did not listen on {port} within {timeout} s:\n{process.log()}")
