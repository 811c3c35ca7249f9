"""A Docker engine for the container test: found or started, its base image built from the Debian mirror when
missing, images built with the host's own pip sources, and a compose command that speaks to it.

Every helper calls `pytest.skip` (with the reason) where this machine cannot run containers, so the test skips
cleanly on a laptop without Docker and runs wherever an engine can start (CI here: `.ci/run` installs one).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_CONTEXT = ("pyproject.toml", "README.md", "swarm", "node", "client", "docker")
LEFT_OUT = re.compile(r"(^|/)(__pycache__|build|[^/]*\.egg-info)(/|$)")
LOCAL_BASE_IMAGE = "local/debian:bookworm"
"""Built by scripts/build_base_image.sh where Docker Hub is out of reach; kept between runs like a pulled base."""


def run(args: list[str], timeout: float, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:4])} ... exit {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


@dataclass
class Engine:
    compose: list[str]
    """`docker compose` where the plugin exists, else `docker-compose` (1.28 or newer: profiles)."""
    dockerd: subprocess.Popen[bytes] | None = None
    """The engine this test started (and stops), or None when one was running already."""

    def stop(self) -> None:
        if self.dockerd is not None and self.dockerd.poll() is None:
            self.dockerd.terminate()  # dockerd stops its containerd and leaves its storage for the next run
            try:
                self.dockerd.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.dockerd.kill()
                self.dockerd.wait(timeout=10)


def start_engine(log_path: Path) -> Engine:
    """The running engine, or one started now (as root, where `dockerd` is installed); skips where neither."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client (apt-get install docker.io)")
    compose = compose_command()
    if engine_answers():
        return Engine(compose)
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.skip("no Docker engine running, and this user cannot start one (dockerd, as root)")
    with open(log_path, "wb") as log:
        dockerd = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine = Engine(compose, dockerd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and dockerd.poll() is None:
        if engine_answers():
            return engine
        time.sleep(0.5)
    engine.stop()
    tail = log_path.read_text(errors="replace")[-2000:]
    pytest.skip(f"dockerd did not start here:\n{tail}")


def engine_answers() -> bool:
    return run(["docker", "info"], timeout=30, check=False).returncode == 0


def compose_command() -> list[str]:
    if run(["docker", "compose", "version"], timeout=30, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    version = run(["docker-compose", "version", "--short"], timeout=30, check=False).stdout.strip()
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < (1, 28):
        pytest.skip(f"docker-compose {version} predates profiles (1.28)")
    return ["docker-compose"]


def base_image() -> str:
    """$SWARM_TEST_BASE_IMAGE, else the local Debian image, built from the Debian mirror apt uses when missing."""
    image = os.environ.get("SWARM_TEST_BASE_IMAGE", LOCAL_BASE_IMAGE)
    if image != LOCAL_BASE_IMAGE or run(["docker", "image", "inspect", image], 30, check=False).returncode == 0:
        return image
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip(f"no {image} image and no way to build it here (debootstrap, as root)")
    run(["bash", str(REPO / "scripts" / "build_base_image.sh"), image], timeout=600)
    return image


def build_image(tag: str, base: str, build_args: dict[str, str]) -> None:
    args = ["docker", "build", "--network", "host", "--force-rm", "-f", "docker/Dockerfile", "-t", tag]
    for name, value in {"BASE_IMAGE": base, **build_args}.items():
        args += ["--build-arg", f"{name}={value}"]
    with tempfile.TemporaryFile() as context:
        write_build_context(context)
        context.seek(0)
        run([*args, "-"], timeout=900, stdin=context)


def write_build_context(file: BinaryIO) -> None:
    """The files the Dockerfile copies, as a tar: a checkout's virtual environments, models and caches never
    travel to the engine (the legacy builder sends the whole context)."""

    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if LEFT_OUT.search(member.name) else member

    # GNU, not PAX: the docker CLI tells a tar on stdin from a Dockerfile by its first 1 KiB, where PAX puts a
    # header of its own (mtime with a fraction) before the first file.
    with tarfile.open(fileobj=file, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in BUILD_CONTEXT:
            tar.add(REPO / name, arcname=name, filter=keep)


@contextmanager
def host_pip_sources() -> Iterator[dict[str, str]]:
    """Build arguments that give pip inside a build what the host's pip uses (`pip config list`, which includes
    PIP_* variables): its index, extra indexes and local wheel folders, and torch from that index, the way the
    host's own `pip install torch==...` gets it. Local folders are served over HTTP on 127.0.0.1 while the build
    runs (builds use host networking). Nothing is passed where the host's pip has no such settings: the
    Dockerfile's defaults then apply (the PyTorch CPU index)."""
    settings = pip_settings()
    if not settings:
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="swarm-pip-") as root, _serve(Path(root)) as base_url:
        args = {}
        for option, variable in (
            ("index-url", "PIP_INDEX_URL"),
            ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
            ("find-links", "PIP_FIND_LINKS"),
            ("trusted-host", "PIP_TRUSTED_HOST"),
        ):
            items = settings.get(option, "").split()
            if option != "trusted-host":
                items = [url for item in items if (url := _reachable(item, Path(root), base_url, option))]
            if items:
                args[variable] = " ".join(items)
        args["TORCH_INDEX"] = args.get("PIP_INDEX_URL", "https://pypi.org/simple")
        yield args


def pip_settings() -> dict[str, str]:
    """Effective `pip config list` values by option: a PIP_* variable wins over `install.`, which wins over
    `global.` (each file section already holds the last file's value)."""
    listing = run([sys.executable, "-m", "pip", "config", "list"], timeout=60, check=False).stdout
    found: dict[str, dict[str, str]] = {}
    for section, option, value in re.findall(r"^([^.\s]+)\.([a-z-]+)='(.*)'$", listing, re.MULTILINE):
        found.setdefault(option, {})[section] = value
    wanted = ("index-url", "extra-index-url", "find-links", "trusted-host")
    rank = (":env:", "install", "global")
    return {
        option: next(values[section] for section in rank if section in values)
        for option, values in found.items()
        if option in wanted and any(section in values for section in rank)
    }


def _reachable(item: str, root: Path, base_url: str, option: str) -> str | None:
    """`item` as a URL the build can open: http(s) as it is, a local folder served from `root`."""
    if item.startswith(("http://", "https://")):
        return item
    path = Path(unquote(urlsplit(item).path) if item.startswith("file:") else item)
    if not path.is_dir():
        return None
    # An index's pages link to files beside it (../../files/...): serve its parent; a wheel folder as it is.
    exposed = path.parent if option.endswith("index-url") else path
    link = root / exposed.relative_to(exposed.anchor)
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(exposed, target_is_directory=True)
    return f"{base_url}{path.as_posix()}/"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _serve(root: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
