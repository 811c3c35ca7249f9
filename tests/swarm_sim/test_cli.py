"""The command line and the dashboard, run as a user would against a real swarm."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedModel

from swarm.client.local_swarm import LocalSwarm, child_env


def swarm_client(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swarm.client.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**env),
    )


def test_generate_streams_the_local_greedy_continuation(
    tiny_llama: Path, llama_swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = "Once upon a time"
    inputs = tokenizer(prompt, return_tensors="pt")
    expected_ids = local_llama.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs.input_ids.shape[1] :]
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)

    result = swarm_client(
        "generate",
        prompt,
        "--model",
        str(tiny_llama),
        "--registry",
        llama_swarm.registry_url,
        "--max-new-tokens",
        "12",
        "--greedy",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.strip()
    assert expected.strip()


def test_generate_without_flags_uses_the_environment(tiny_llama: Path, llama_swarm: LocalSwarm) -> None:
    result = swarm_client(
        "generate",
        "Once upon a time",
        "--max-new-tokens",
        "4",
        SWARM_REGISTRY=llama_swarm.registry_url,
        SWARM_MODEL=str(tiny_llama),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_status_lists_coverage_as_json_and_as_a_table(llama_swarm: LocalSwarm) -> None:
    result = swarm_client("status", "--registry", llama_swarm.registry_url, "--json")
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert models["tiny-llama"]["usable"] and models["tiny-llama"]["coverage"] == [1] * 8
    assert models["tiny-partial"]["missing"] == [[4, 8]]

    table = swarm_client("status", "--registry", llama_swarm.registry_url)
    assert "tiny-llama" in table.stdout and "ready" in table.stdout and "4-7" in table.stdout


def test_wait_ready_times_out_with_exit_code_1(llama_swarm: LocalSwarm) -> None:
    result = swarm_client(
        "status", "--registry", llama_swarm.registry_url, "--model", "tiny-partial", "--wait-ready", "1"
    )
    assert result.returncode == 1
    assert "not fully served" in result.stderr


def test_unreachable_registry_is_a_clear_error() -> None:
    result = swarm_client("status", "--registry", "ws://127.0.0.1:9")
    assert result.returncode == 2
    assert "no registry answered" in result.stderr and "swarm-registry" in result.stderr


def test_dashboard_and_state_api_are_served_by_the_registry(llama_swarm: LocalSwarm) -> None:
    base = f"http://127.0.0.1:{llama_swarm.registry_port}"
    page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
    assert "swarm coverage" in page and "/api/v1/state" in page
    assert 'src="http' not in page and 'href="http' not in page, "the dashboard must work offline"
    state = json.loads(urllib.request.urlopen(base + "/api/v1/state", timeout=10).read())
    names = {model["name"] for model in state["models"]}
    assert {"tiny-llama", "tiny-overlap", "tiny-partial"} <= names
    assert all(peer["state"] == "online" for peer in state["peers"])
    assert len(state["peers"]) == 5


def test_node_refuses_layers_outside_the_model(tiny_llama: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.node.main",
            "--model",
            str(tiny_llama),
            "--layers",
            "6-9",
            "--registry",
            "ws://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert result.returncode == 2
    assert "6-9" in result.stderr and "0-7" in result.stderr


def test_float16_on_cpu_is_refused_with_a_reason(tiny_llama: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swarm.node.main", "--model", str(tiny_llama), "--layers", "0-1", "--dtype", "float16"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert result.returncode == 2 and "float16 is not supported on CPU" in result.stderr
