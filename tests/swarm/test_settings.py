from __future__ import annotations

import argparse

import pytest
from pydantic_settings import SettingsConfigDict

from swarm.checkpoint import model_name_from_path
from swarm.settings import (
    DEFAULT_REGISTRY,
    Registries,
    SwarmSettings,
    environment_help,
    parse_layer_range,
    parse_registries,
    shared,
)


def test_layer_ranges_are_inclusive_on_the_command_line() -> None:
    assert parse_layer_range("0-9") == (0, 10)
    assert parse_layer_range("4") == (4, 5)
    for bad in ("9-0", "a-b", "-3", ""):
        with pytest.raises(ValueError):
            parse_layer_range(bad)


def test_registry_lists_are_comma_separated_websocket_urls() -> None:
    assert parse_registries(None) == [DEFAULT_REGISTRY]
    assert parse_registries("ws://a:1, ws://b:2") == ["ws://a:1", "ws://b:2"]
    assert parse_registries(["wss://c:3"]) == ["wss://c:3"]
    with pytest.raises(ValueError):
        parse_registries("http://nope")


class ExampleSettings(SwarmSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_EXAMPLE_")

    registry: Registries = shared("SWARM_REGISTRY", [DEFAULT_REGISTRY])
    token: str | None = shared("SWARM_TOKEN", repr=False)
    port: int = 7
    verbose: bool = False


def test_a_flag_wins_over_the_environment_which_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ExampleSettings().port == 7
    monkeypatch.setenv("SWARM_EXAMPLE_PORT", "8")
    monkeypatch.setenv("SWARM_REGISTRY", "ws://env:1,ws://env:2")
    assert ExampleSettings.from_flags({"port": None, "registry": None}).port == 8
    assert ExampleSettings.from_flags({"port": 9, "unrelated_flag": "x"}).port == 9
    assert ExampleSettings().registry == ["ws://env:1", "ws://env:2"]
    assert ExampleSettings.from_flags({"registry": "ws://flag:1"}).registry == ["ws://flag:1"]
    with pytest.raises(ValueError, match="must look like"):
        ExampleSettings(registry="http://nope")


def test_help_names_each_variable_next_to_its_flag() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--token")
    parser.add_argument("--quiet", dest="verbose", action="store_const", const=False)
    text = environment_help(parser, ExampleSettings)
    rows = [line.split() for line in text.splitlines()[1:]]
    assert rows == [
        ["SWARM_TOKEN", "--token"],
        ["SWARM_EXAMPLE_PORT", "--port"],
        ["SWARM_EXAMPLE_VERBOSE", "--quiet", "(true", "or", "false)"],
    ]


def test_model_name_is_the_last_path_component_unless_overridden() -> None:
    assert model_name_from_path("./models/tiny-llama/") == "tiny-llama"
    assert model_name_from_path("/x/y", "custom") == "custom"
