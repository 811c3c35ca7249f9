from __future__ import annotations

import pytest

from swarm.checkpoint import model_name_from_path
from swarm.settings import DEFAULT_REGISTRY, parse_layer_range, parse_registries


def test_layer_ranges_are_inclusive_on_the_command_line() -> None:
    assert parse_layer_range("0-9") == (0, 10)
    assert parse_layer_range("4") == (4, 5)
    for bad in ("9-0", "a-b", "-3", ""):
        with pytest.raises(ValueError):
            parse_layer_range(bad)


def test_registries_come_from_flag_env_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_REGISTRY", raising=False)
    assert parse_registries(None) == [DEFAULT_REGISTRY]
    monkeypatch.setenv("SWARM_REGISTRY", "ws://a:1,ws://b:2")
    assert parse_registries(None) == ["ws://a:1", "ws://b:2"]
    assert parse_registries("wss://c:3") == ["wss://c:3"]
    with pytest.raises(ValueError):
        parse_registries("http://nope")


def test_model_name_is_the_last_path_component_unless_overridden() -> None:
    assert model_name_from_path("./models/tiny-llama/") == "tiny-llama"
    assert model_name_from_path("/x/y", "custom") == "custom"
