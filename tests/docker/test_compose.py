"""The container files, checked without a Docker engine: both compose files parse and agree, every command they
run is a real swarm command whose arguments our own parsers accept, every SWARM_* variable they set is one that
process reads, and the image's health check tells healthy from not. (tests/docker/test_containers.py runs them.)"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from swarm.client.cli.main import build_parser as client_parser
from swarm.node.main import build_parser as node_parser
from swarm.registry.main import build_parser as registry_parser

DOCKER = Path(__file__).resolve().parents[2] / "docker"
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "swarm-registry": registry_parser,
    "swarm-node": node_parser,
    "swarm-client": client_parser,
}
SERVICES = {"registry", "node-a", "node-b", "node-spare", "gateway"}


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(scope="module", params=["compose.yaml", "compose.host.yaml"])
def compose(request: pytest.FixtureRequest) -> dict:
    return load(request.param)


def commands(service: dict) -> list[list[str]]:
    """The service's command and the swarm commands in its health check (`a && b` shell form included)."""
    found = [service["command"]]
    kind, *test = service["healthcheck"]["test"]
    parts = [shlex.split(part) for part in test[0].split("&&")] if kind == "CMD-SHELL" else [test]
    return found + [part for part in parts if part[0] in PARSERS]


def subcommand_parser(program: str, args: list[str]) -> argparse.ArgumentParser:
    parser = PARSERS[program]()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and args and args[0] in action.choices:
            return action.choices[args[0]]
    return parser


def test_compose_starts_a_registry_two_nodes_covering_the_demo_model_and_the_gateway() -> None:
    services = load("compose.yaml")["services"]
    assert set(services) == SERVICES
    assert services["registry"]["ports"] == ["${SWARM_COMPOSE_REGISTRY_PORT:-7000}:7000"]
    assert services["gateway"]["ports"] == ["${SWARM_COMPOSE_GATEWAY_PORT:-8000}:8000"]
    by_default = {name for name, service in services.items() if "profiles" not in service}
    assert by_default == {"registry", "node-a", "node-b", "gateway"}
    assert services["node-spare"]["profiles"] == ["spare"]
    nodes = {name: services[name]["command"] for name in ("node-a", "node-b", "node-spare")}
    layers = {name: command[command.index("--layers") + 1] for name, command in nodes.items()}
    assert layers == {"node-a": "0-3", "node-b": "4-7", "node-spare": "0-7"}  # any one node may die


def test_every_service_waits_for_a_healthy_registry_and_has_a_health_check(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
        if name != "registry":
            assert service["depends_on"] == {"registry": {"condition": "service_healthy"}}
    gateway_check = compose["services"]["gateway"]["healthcheck"]["test"][1]
    assert "swarm-client status --wait-ready" in gateway_check  # healthy = every layer served


def test_every_command_in_compose_parses_with_the_real_cli(compose: dict) -> None:
    for name, service in compose["services"].items():
        for command in commands(service):
            program, *args = command
            assert program in PARSERS, f"{name} runs {program}, not a swarm command"
            PARSERS[program]().parse_args(args)  # exits (fails the test) on an unknown flag


def test_every_swarm_variable_in_compose_is_read_by_that_process(compose: dict) -> None:
    for name, service in compose["services"].items():
        program, *args = service["command"]
        help_text = subcommand_parser(program, args).format_help()
        for variable in service["environment"]:
            assert re.search(rf"^\s+{variable}\s", help_text, re.MULTILINE), f"{program} ({name}) ignores {variable}"
        for check in service["healthcheck"]["test"][1:]:
            for used in re.findall(r"\$\{(SWARM_\w+)\}", check):
                assert used in service["environment"], f"{name}'s health check reads {used}, which it does not set"


def test_the_host_network_file_runs_the_same_services_on_loopback_ports_of_their_own() -> None:
    bridge, host = load("compose.yaml")["services"], load("compose.host.yaml")["services"]
    assert set(host) == set(bridge)
    for name, service in host.items():
        for key in ("command", "healthcheck", "depends_on", "profiles", "restart", "image"):
            assert service.get(key) == bridge[name].get(key), f"{name}: {key} differs between the compose files"
        assert service["network_mode"] == "host" and "ports" not in service
        assert set(service["environment"]) == set(bridge[name]["environment"])
        for variable, value in service["environment"].items():
            if variable.endswith(("_HOST", "REGISTRY", "PUBLIC_ADDRESS")):
                assert "127.0.0.1" in value, f"{name}: {variable}={value} leaves loopback"
    ports = [
        str(value)
        for service in host.values()
        for key, value in service["environment"].items()
        if key.endswith("_PORT")
    ]
    defaults = [re.sub(r"\$\{\w+:-(\d+)\}", r"\1", port) for port in ports]
    assert len(set(defaults)) == len(host), f"two processes share a port: {defaults}"


def test_the_dockerfile_takes_its_base_installs_cpu_torch_first_and_runs_unprivileged() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert text.index('"torch==${TORCH_VERSION}"') < text.index("pip install .")
    assert "BASE_IMAGE=nvidia/cuda:" in text and "whl/cu" in text  # the CUDA build is documented
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*CMD \[\"swarm-healthcheck\"\]", text, re.MULTILINE)
    for variable in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        assert f"ARG {variable}\n" in text  # a build argument, never an ENV kept in the image


class _Pages(BaseHTTPRequestHandler):
    PAGES = {
        "/registry/healthz": b"ok\n",
        "/node/healthz": b"online\n",
        "/loading-node/healthz": b"joining\n",
        "/draining-node/healthz": b"draining\n",
        "/gateway/v1/models": b'{"object": "list", "data": []}',
    }

    def do_GET(self) -> None:
        body = self.PAGES.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def pages() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "healthy"),
    [
        ("/registry/healthz", True),
        ("/node/healthz", True),
        ("/loading-node/healthz", False),
        ("/draining-node/healthz", False),
        ("/gateway/v1/models", True),
        ("/missing", False),
    ],
)
def test_the_health_check_passes_only_a_ready_process(pages: str, path: str, healthy: bool) -> None:
    check = [sys.executable, str(DOCKER / "healthcheck.py"), pages + path]
    result = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert (result.returncode == 0) == healthy, result.stderr


def test_the_health_check_fails_when_nothing_listens() -> None:
    result = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), "http://127.0.0.1:9/healthz"], timeout=30)
    assert result.returncode == 1


def compose_programs() -> list[list[str]]:
    found = []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


@pytest.mark.parametrize("name", ["compose.yaml", "compose.host.yaml"])
def test_compose_accepts_the_files_where_it_is_installed(name: str) -> None:
    programs = compose_programs()
    if not programs:
        pytest.skip("neither docker compose nor docker-compose is installed")
    for program in programs:
        args = [*program, "-f", str(DOCKER / name), "--profile", "spare", "config", "-q"]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(program)}: {result.stderr}"
