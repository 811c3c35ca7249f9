"""Private swarms: without the token nothing gets in, not even an HTTP page; with TLS everything travels over
wss://."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from transformers import PreTrainedModel
from websockets.sync.client import connect

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm, Process, child_env
from swarm.errors import RegistryUnavailableError, RemoteError
from swarm.protocol import PROTOCOL_VERSION, Hello, decode_message, encode_message

TOKEN = "correct horse battery staple"
PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7]])


@pytest.fixture(scope="module")
def private_swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    with LocalSwarm(tmp_path_factory.mktemp("private"), token=TOKEN) as swarm:
        swarm.start_registry("--token", TOKEN)
        swarm.start_node(tiny_llama, "0-3", "--token", TOKEN)
        swarm.start_node(tiny_llama, "4-7", "--token", TOKEN)
        swarm.wait_ready("tiny-llama")
        yield swarm


def test_the_right_token_works_end_to_end(
    tiny_llama: Path, private_swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=private_swarm.registry_url, token=TOKEN)
    try:
        output = model.generate(PROMPT, max_new_tokens=10, do_sample=False)
    finally:
        model.close()
    assert output.tolist() == local_llama.generate(PROMPT, max_new_tokens=10, do_sample=False).tolist()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_queries_without_the_token_are_unauthorized(
    tiny_llama: Path, private_swarm: LocalSwarm, token: str | None
) -> None:
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=private_swarm.registry_url, token=token)
    try:
        with pytest.raises(RemoteError, match="SWARM_TOKEN") as info:
            model.generate(PROMPT, max_new_tokens=2, do_sample=False)
        assert info.value.code == "unauthorized"
    finally:
        model.close()


@pytest.mark.parametrize("token", [None, "wrong"])
def test_steps_without_the_token_are_unauthorized(private_swarm: LocalSwarm, token: str | None) -> None:
    node = next(p for p in private_swarm.processes if "swarm.node.main" in p.args)
    with connect(node.address, open_timeout=10) as connection:
        connection.send(encode_message(Hello(version=PROTOCOL_VERSION, token=token)))
        reply = decode_message(connection.recv(timeout=10))
    assert reply.type == "error" and reply.code == "unauthorized"


def test_a_node_without_the_token_cannot_announce(tiny_llama: Path, private_swarm: LocalSwarm) -> None:
    intruder_token = "intruder-guess-42"
    intruder = private_swarm.start_node(tiny_llama, "0-7", "--model-name", "intruder", "--token", intruder_token)
    try:
        deadline = time.monotonic() + 60
        while "unauthorized" not in intruder.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "unauthorized" in intruder.log()
        assert TOKEN not in intruder.log() and intruder_token not in intruder.log()
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "swarm.client.cli.main",
                "status",
                "--json",
                "--registry",
                private_swarm.registry_url,
                "--token",
                TOKEN,
            ],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )
        assert status.returncode == 0 and "intruder" not in status.stdout
    finally:
        intruder.kill()


def http_status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_every_http_page_of_a_private_swarm_needs_the_token(private_swarm: LocalSwarm) -> None:
    registry = f"http://127.0.0.1:{private_swarm.registry_port}"
    running = [p for p in private_swarm.processes if "swarm.node.main" in p.args and p.popen.poll() is None]
    nodes = [node.address.replace("ws://", "http://") for node in running]
    urls = [registry + path for path in ("/", "/api/v1/state", "/metrics", "/healthz")]
    urls += [node + path for node in nodes for path in ("/metrics", "/healthz")]
    assert {url: http_status(url) for url in urls} == dict.fromkeys(urls, 401)
    assert {url: http_status(url, "wrong") for url in urls} == dict.fromkeys(urls, 401)
    assert {url: http_status(url, TOKEN) for url in urls} == dict.fromkeys(urls, 200)
    assert http_status(f"{registry}/?token={urllib.parse.quote(TOKEN)}") == 200  # the dashboard, from a browser


def test_tokens_never_reach_logs(private_swarm: LocalSwarm) -> None:
    for process in private_swarm.processes:
        assert TOKEN not in process.log()


def write_self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_a_whole_swarm_over_wss(tiny_llama: Path, tmp_path: Path, local_llama: PreTrainedModel) -> None:
    cert, key = write_self_signed_certificate(tmp_path)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    with LocalSwarm(tmp_path, scheme="wss", tls_ca=str(cert)) as swarm:
        swarm.start_registry(*tls)
        nodes: list[Process] = [
            swarm.start_node(tiny_llama, layers, *tls, "--tls-ca", str(cert)) for layers in ("0-3", "4-7")
        ]
        swarm.wait_ready("tiny-llama")
        assert all(node.address.startswith("wss://") for node in nodes)
        model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url, tls_ca=str(cert))
        try:
            output = model.generate(PROMPT, max_new_tokens=10, do_sample=False)
            chain = model.runner.run(model.planner.plan())
        finally:
            model.close()
        untrusting = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url)
        try:
            with pytest.raises((RegistryUnavailableError, RemoteError), match=r"(?i)certificate"):
                untrusting.generate(PROMPT, max_new_tokens=2, do_sample=False)
        finally:
            untrusting.close()
    assert all(link.peer.address.startswith("wss://") for link in chain)
    assert output.tolist() == local_llama.generate(PROMPT, max_new_tokens=10, do_sample=False).tolist()
