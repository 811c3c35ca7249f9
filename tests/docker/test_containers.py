"""The container swarm for real: build docker/Dockerfile, bring docker/compose.host.yaml up (registry, nodes
0-3 and 4-7, a spare node with all 8 layers, the gateway), ask the gateway for OpenAI completions and check
them against local `generate`, kill the node container that served them, and ask again.

Runs where a Docker engine can run (the `docker` marker; skipped with the reason elsewhere), starting `dockerd`
itself when it is installed but stopped, and stopping it again. Everything stays on loopback: images build and
containers run on host networking, each process on a free port. Containers, volumes and the swarm image are
removed afterwards; the Debian base image (scripts/build_base_image.sh, built here when missing) is kept, as a
pulled base image would be, so that the next run skips its 35 s.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.client.local_swarm import free_port
from swarm.default_model import DEFAULT_MODEL_NAME, default_model_path
from tests.docker.engine import REPO, Engine, base_image, build_image, host_pip_sources, run, start_engine

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

COMPOSE_FILE = REPO / "docker" / "compose.host.yaml"
NODES = ("node-a", "node-b", "node-spare")
PROMPT = "Once upon a time"
MAX_TOKENS = 24
READY_TIMEOUT = 300.0


@dataclass
class ComposeSwarm:
    engine: Engine
    project: str
    ports: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        base = [*self.engine.compose, "-p", self.project, "-f", str(COMPOSE_FILE), "--profile", "spare"]
        return run([*base, *args], timeout=timeout, check=check, env=self.env).stdout

    def container(self, service: str) -> str:
        labels = [f"label=com.docker.compose.project={self.project}", f"label=com.docker.compose.service={service}"]
        ids = run(["docker", "ps", "-aq", *[arg for label in labels for arg in ("--filter", label)]], 30).stdout
        assert ids.split(), f"no container for {service}"
        return ids.split()[0]

    def state(self, service: str) -> tuple[str, str]:
        """(status, health) of a service's container, e.g. ("running", "healthy")."""
        fmt = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}"
        status, health = run(["docker", "inspect", "-f", fmt, self.container(service)], 30).stdout.split()
        return status, health

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", check=False)[-12000:]

    def wait_healthy(self) -> None:
        """Until every container is healthy: the gateway's check includes `swarm-client status --wait-ready`,
        so a healthy gateway means every layer is served."""
        services = ("registry", *NODES, "gateway")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            states = {service: self.state(service) for service in services}
            if all(health == "healthy" for _, health in states.values()):
                return
            broken = {service: state for service, state in states.items() if state[0] != "running"}
            assert not broken, f"containers stopped while starting: {broken}\n{self.logs()}"
            time.sleep(2)
        raise AssertionError(f"not healthy within {READY_TIMEOUT:.0f} s: {states}\n{self.logs()}")

    def complete(self) -> dict:
        body = {"model": DEFAULT_MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['gateway']}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())

    def steps_served(self, service: str) -> float:
        """The node's `swarm_node_steps_total{kind="step"}`: decode steps it computed on a route."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[service]}/metrics", timeout=10) as reply:
            match = re.search(r'^swarm_node_steps_total\{kind="step"\} (\S+)$', reply.read().decode(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = start_engine(tmp_path_factory.mktemp("docker") / "dockerd.txt")
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[str]:
    tag = f"swarm-test:{secrets.token_hex(4)}"
    base = base_image()
    try:
        with host_pip_sources() as pip_args:
            build_image(tag, base, pip_args)
        yield tag
    finally:
        run(["docker", "rmi", "-f", tag], timeout=120, check=False)


@pytest.fixture(scope="module")
def swarm(engine: Engine, image: str) -> Iterator[ComposeSwarm]:
    services = ("registry", *NODES, "gateway")
    ports = {service: free_port() for service in services}
    while len(set(ports.values())) < len(services):  # free_port() may hand out one port twice
        ports = {service: free_port() for service in services}
    variables = {
        "SWARM_COMPOSE_IMAGE": image,
        "SWARM_COMPOSE_REGISTRY_PORT": str(ports["registry"]),
        "SWARM_COMPOSE_GATEWAY_PORT": str(ports["gateway"]),
        **{f"SWARM_COMPOSE_NODE_{node.removeprefix('node-').upper()}_PORT": str(ports[node]) for node in NODES},
    }
    swarm = ComposeSwarm(engine, f"swarmtest{secrets.token_hex(4)}", ports, {**os.environ, **variables})
    try:
        swarm.compose("up", "-d", "--no-build")
        swarm.wait_healthy()
        yield swarm
    finally:
        swarm.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)


@pytest.fixture(scope="module")
def local_text() -> str:
    """What local transformers `generate` writes after PROMPT, greedy, on the checkpoint the containers serve."""
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=eos)[0, ids.shape[1] :].tolist()
    return tokenizer.decode(out[: out.index(eos)] if eos in out else out, skip_special_tokens=True)


def test_the_gateway_container_completes_like_local_generate(swarm: ComposeSwarm, local_text: str) -> None:
    reply = swarm.complete()
    assert reply["model"] == DEFAULT_MODEL_NAME
    assert reply["choices"][0]["text"] == local_text, swarm.logs()


def test_the_swarm_keeps_serving_after_the_node_container_that_served_is_killed(
    swarm: ComposeSwarm, local_text: str
) -> None:
    before = {node: swarm.steps_served(node) for node in NODES}
    assert swarm.complete()["choices"][0]["text"] == local_text
    served = {node: swarm.steps_served(node) - before[node] for node in NODES}
    victim = max(served, key=served.__getitem__)
    assert served[victim] > 0, f"no node computed a decode step: {served}"
    run(["docker", "kill", swarm.container(victim)], timeout=60)
    survivors = [node for node in NODES if node != victim]
    before = {node: swarm.steps_served(node) for node in survivors}

    reply = swarm.complete()

    assert reply["choices"][0]["text"] == local_text, swarm.logs()
    assert swarm.state(victim)[0] == "exited", "the killed node came back: the request may have used it"
    served = {node: swarm.steps_served(node) - before[node] for node in survivors}
    assert any(steps > 0 for steps in served.values()), f"no surviving node served the request: {served}"
