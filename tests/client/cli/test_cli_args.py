"""How `swarm-client` flags map onto Hugging Face `generate()` arguments and model choice."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from swarm.client.cli.main import build_parser, sampling_kwargs
from swarm.client.cli.resolve import resolve_model

from swarm.default_model import default_model_path
from swarm.transport import Credentials


def parse(*argv: str):
    return build_parser().parse_args(["generate", "hi", *argv])


def test_flags_choose_greedy_or_sampling() -> None:
    assert sampling_kwargs(parse()) == {}
    assert sampling_kwargs(parse("--greedy", "--temperature", "0.5")) == {"do_sample": False}
    assert sampling_kwargs(parse("--temperature", "0.7", "--top-k", "5")) == {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 5,
    }


def test_explicit_model_and_environment_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_MODEL", "/from/env")
    assert asyncio.run(resolve_model("/explicit", ["ws://127.0.0.1:9"], Credentials())) == Path("/explicit")
    assert asyncio.run(resolve_model(None, ["ws://127.0.0.1:9"], Credentials())) == Path("/from/env")


def test_without_a_registry_the_embedded_model_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_MODEL", raising=False)
    assert asyncio.run(resolve_model(None, ["ws://127.0.0.1:9"], Credentials())) == default_model_path()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--port", "9000", "--api-key", "k"], {"port": 9000, "api_key": "k", "host": "127.0.0.1"}),
        (["chat", "--temperature", "0", "--system", "Be brief."], {"temperature": 0.0, "max_length": 2048}),
        (["score", "f.txt", "--choices", "yes,no"], {"file": "f.txt", "choices": "yes,no", "separator": " "}),
        (["batch", "in.jsonl", "out.jsonl"], {"input": "in.jsonl", "output": "out.jsonl", "concurrency": 4}),
    ],
)
def test_every_command_takes_the_common_and_model_flags(argv: list[str], expected: dict[str, object]) -> None:
    args = build_parser().parse_args([*argv, "--model", "m", "--registry", "ws://r:1", "--token", "t"])
    assert {key: getattr(args, key) for key in expected} == expected
    assert (args.model, args.registry, args.token, args.compression) == ("m", "ws://r:1", "t", "none")
    assert build_parser().parse_args([*argv, "--compression", "int8-block"]).compression == "int8-block"


@pytest.mark.parametrize("command", ["generate", "chat", "score", "batch", "serve"])
def test_help_shows_runnable_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and f"  swarm-client {command} " in help_text


def test_estimate_reports_sizes_and_nodes_needed(capsys) -> None:
    import json

    from swarm.client.cli.main import main

    assert main(["estimate", "--memory", "2MiB", "--cache-tokens", "1024", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_layers"] == 8 and report["parameters"] > 1_000_000
    float32 = report["dtypes"]["float32"]
    assert float32["layers_per_node"] >= 1
    assert float32["nodes_to_cover"] == -(-8 // float32["layers_per_node"])
    assert report["dtypes"]["int8"]["layer_bytes"] * 4 == float32["layer_bytes"]


def test_the_cli_starts_without_loading_transformers() -> None:
    """`swarm-client --help` and commands that load no model stay quick: the model's imports wait until used."""
    probe = "import sys, swarm.client, swarm.client.cli.main; "
    probe += "sys.exit('transformers' in sys.modules or 'swarm.client.core.model' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
