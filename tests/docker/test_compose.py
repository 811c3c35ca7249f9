"""The container files, checked without a Docker engine: the compose file parses, and every command
it runs is a real swarm command whose arguments our own parsers accept."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from swarm.client.cli.main import build_parser as client_parser
from swarm.node.main import build_parser as node_parser
from swarm.registry.main import build_parser as registry_parser

DOCKER = Path(__file__).resolve().parents[2] / "docker"
PARSERS = {"swarm-registry": registry_parser, "swarm-node": node_parser, "swarm-client": client_parser}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_starts_a_registry_two_nodes_covering_the_demo_model_and_the_gateway(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"registry", "node-a", "node-b", "gateway"}
    assert services["registry"]["ports"] == ["7000:7000"] and services["gateway"]["ports"] == ["8000:8000"]
    layers = [
        services[name]["command"][services[name]["command"].index("--layers") + 1] for name in ("node-a", "node-b")
    ]
    assert layers == ["0-3", "4-7"]
    for name in ("node-a", "node-b", "gateway"):
        assert services[name]["depends_on"]["registry"]["condition"] == "service_healthy"
        assert services[name]["environment"]["SWARM_REGISTRY"] == "ws://registry:7000"
    assert services["gateway"]["healthcheck"]["test"][1:4] == ["swarm-client", "status", "--wait-ready"]


def test_every_command_in_compose_parses_with_the_real_cli(compose: dict) -> None:
    for name, service in compose["services"].items():
        commands = [service["command"]]
        if service.get("healthcheck", {}).get("test", [None])[1:2] == ["swarm-client"]:
            commands.append(service["healthcheck"]["test"][1:])
        for command in commands:
            program, *args = command
            assert program in PARSERS, f"{name} runs {program}, not a swarm command"
            PARSERS[program]().parse_args(args)  # exits (fails the test) on an unknown flag


def test_the_dockerfile_pins_cpu_torch_and_offers_a_cuda_base() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "torch==${TORCH_VERSION}" in text
    assert "ARG TORCH_VERSION=2.13.0" in text and "whl/cpu" in text


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_accepts_the_file_where_compose_is_installed() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker client here has no compose plugin")
    result = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "-q"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
