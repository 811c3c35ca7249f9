"""How `swarm-client` flags map onto Hugging Face `generate()` arguments and model choice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from swarm.client.cli.generate import sampling_kwargs
from swarm.client.cli.main import build_parser
from swarm.client.cli.resolve import resolve_model
from swarm.client.core.settings import ClientSettings
from swarm.client.serve.settings import GatewaySettings
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


def test_the_model_flag_wins_over_swarm_model_which_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_MODEL", "/from/env")
    assert ClientSettings.from_flags(parse("--model", "/explicit")).model == "/explicit"
    assert ClientSettings.from_flags(parse()).model == "/from/env"
    assert asyncio.run(resolve_model("/explicit", ["ws://127.0.0.1:9"], Credentials())) == Path("/explicit")


def test_client_settings_come_from_flags_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_REGISTRY", "ws://env:1,ws://env:2")
    monkeypatch.setenv("SWARM_TOKEN", "env-token")
    monkeypatch.setenv("SWARM_CLIENT_COMPRESSION", "int8-block")
    monkeypatch.setenv("SWARM_GATEWAY_PORT", "9100")
    from_env = ClientSettings.from_flags(parse())
    assert (from_env.registry, from_env.token, from_env.compression) == (
        ["ws://env:1", "ws://env:2"],
        "env-token",
        "int8-block",
    )
    flagged = ClientSettings.from_flags(parse("--registry", "ws://flag:3", "--token", "t", "--compression", "none"))
    assert (flagged.registry, flagged.token, flagged.compression) == (["ws://flag:3"], "t", "none")
    serve = build_parser().parse_args(["serve"])
    assert GatewaySettings.from_flags(serve).port == 9100
    assert GatewaySettings.from_flags(build_parser().parse_args(["serve", "--port", "9200"])).port == 9200


def test_without_a_registry_the_embedded_model_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_MODEL", raising=False)
    assert asyncio.run(resolve_model(None, ["ws://127.0.0.1:9"], Credentials())) == default_model_path()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--port", "9000", "--api-key", "k"], {"port": 9000, "api_key": ["k"]}),
        (["chat", "--temperature", "0", "--system", "Be brief."], {"temperature": 0.0, "max_length": 2048}),
        (["chat", "--draft-model", "default", "--speculate", "4"], {"draft_model": "default", "speculate": 4}),
        (["score", "f.txt", "--choices", "yes,no"], {"file": "f.txt", "choices": "yes,no", "separator": " "}),
        (["batch", "in.jsonl", "out.jsonl"], {"input": "in.jsonl", "output": "out.jsonl", "concurrency": 4}),
    ],
)
def test_every_command_takes_the_common_and_model_flags(argv: list[str], expected: dict[str, object]) -> None:
    args = build_parser().parse_args([*argv, "--model", "m", "--registry", "ws://r:1", "--token", "t"])
    assert {key: getattr(args, key) for key in expected} == expected
    assert (args.model, args.registry, args.token) == ("m", "ws://r:1", "t")
    assert build_parser().parse_args([*argv, "--compression", "int8-block"]).compression == "int8-block"


@pytest.mark.parametrize("command", ["generate", "chat", "score", "batch", "serve"])
def test_help_shows_runnable_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and f"  swarm-client {command} " in help_text
    assert "  SWARM_REGISTRY  " in help_text and "  SWARM_MODEL  " in help_text
    assert ("  SWARM_GATEWAY_API_KEY  " in help_text) == (command == "serve")


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


def test_the_gateway_takes_several_api_keys_and_per_key_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_GATEWAY_API_KEY", "env-a, env-b")
    assert GatewaySettings.from_flags(build_parser().parse_args(["serve"])).api_key == ["env-a", "env-b"]
    flags = ["serve", "--api-key", "key-1", "--api-key", "key-2,key-3", "--max-body-bytes", "65536"]
    flags += ["--max-batch-rows", "8"]
    flags += ["--key-max-concurrency", "2", "--key-requests-per-minute", "60", "--key-tokens-per-minute", "1000"]
    gateway = GatewaySettings.from_flags(build_parser().parse_args(flags))
    assert gateway.api_key == ["key-1", "key-2", "key-3"] and "key-1" not in repr(gateway)
    assert (gateway.max_body_bytes, gateway.max_batch_rows) == (65536, 8)
    limits = (gateway.key_max_concurrency, gateway.key_requests_per_minute, gateway.key_tokens_per_minute)
    assert limits == (2, 60, 1000)
