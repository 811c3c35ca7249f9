"""What a newcomer types: bare commands on the embedded model, and the README's demo."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.client.cli.demo import generation_settings
from swarm.client.local_swarm import LocalSwarm, child_env, free_port
from swarm.default_model import DEFAULT_MODEL_NAME, default_model_path


def local_continuation(prompt: str, new_tokens: int, greedy: bool = True, seed: int = 0) -> str:
    """What local `generate` writes on the embedded model, with the demo's decoding settings."""
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    output = model.generate(
        **inputs, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id, **generation_settings(greedy)
    )
    return tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


def test_bare_node_and_client_commands_serve_the_embedded_model(tmp_path: Path) -> None:
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_registry()
        env = child_env(SWARM_REGISTRY=swarm.registry_url)
        for layers in ("0-3", "4-7"):
            port = str(swarm.new_port())
            swarm.spawn(
                f"bare-{layers}",
                [sys.executable, "-m", "swarm.node.main", "--layers", layers, "--port", port, "--torch-threads", "1"],
                env=env,
            )
        swarm.wait_ready(DEFAULT_MODEL_NAME)
        result = subprocess.run(
            [sys.executable, "-m", "swarm.client.cli.main", "generate", "Once upon a time", "--max-new-tokens", "24"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == local_continuation("Once upon a time", 24).strip()
    assert len(result.stdout.split()) >= 10


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.oracle
def test_the_demo_tells_the_story_local_generate_tells_and_cleans_up() -> None:
    """The README's first command exactly: default sampling, default seed, the demo's own length."""
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "swarm.client.cli.demo", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=240,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    story = "Once upon a time" + local_continuation("Once upon a time", 80, greedy=False, seed=0)
    assert result.stdout.strip() == story.strip()
    assert len(result.stdout.split()) >= 30
    assert f"http://127.0.0.1:{port}/" in result.stderr and "stopping the swarm" in result.stderr
    assert "Failed to load" not in result.stderr and "register_constant" not in result.stderr  # torchao's noise
    assert not port_open(port)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_ctrl_c_or_kill_stops_a_kept_demo_and_its_swarm(stop: signal.Signals) -> None:
    """`swarm-demo --keep &` then `kill %1` (SIGTERM) stops the registry and nodes too, as Ctrl-C does: they run in
    sessions of their own, so nothing but the demo itself can stop them."""
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "swarm.client.cli.demo", "--port", str(port), "--max-new-tokens", "5", "--keep"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        deadline = time.monotonic() + 180
        seen = ""
        while "Ctrl-C" not in seen and time.monotonic() < deadline:
            seen += demo.stderr.readline()
        assert "Ctrl-C" in seen, seen
        assert port_open(port)
        demo.send_signal(stop)
        assert demo.wait(timeout=60) == 0
    finally:
        demo.kill()
    assert not port_open(port)
