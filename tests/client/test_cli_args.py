"""How `swarm-client` flags map onto Hugging Face `generate()` arguments and model choice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from client.cli import build_parser, sampling_kwargs
from client.resolve import resolve_model
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
