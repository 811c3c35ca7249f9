"""`swarm-node` flags and `SWARM_*` variables reach `NodeSettings`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from swarm.node.main import build_parser, settings_from_args
from swarm.node.settings import NodeSettings


def test_prefill_chunk_flag_reaches_node_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert NodeSettings().prefill_chunk == 256
    assert settings_from_args(build_parser().parse_args([])).prefill_chunk == 256
    assert settings_from_args(build_parser().parse_args(["--prefill-chunk", "3"])).prefill_chunk == 3
    assert settings_from_args(build_parser().parse_args(["--prefill-chunk", "0"])).prefill_chunk == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "--prefill-chunk N" in capsys.readouterr().out


def test_prefill_chunk_comes_from_the_environment_and_must_not_be_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_NODE_PREFILL_CHUNK", "64")
    assert NodeSettings().prefill_chunk == 64
    with pytest.raises(ValidationError, match="prefill_chunk"):
        NodeSettings(prefill_chunk=-1)


def test_node_settings_read_node_variables_and_the_shared_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_NODE_PORT", "8123")
    monkeypatch.setenv("SWARM_PORT", "1")  # not a node variable: each process has its own prefix
    monkeypatch.setenv("SWARM_REGISTRY", "ws://a:1,ws://b:2")
    monkeypatch.setenv("SWARM_TOKEN", "secret")
    monkeypatch.setenv("SWARM_MODEL", "/models/m")
    settings = settings_from_args(build_parser().parse_args(["--gpu", "1"]))
    assert (settings.port, settings.registry, settings.token, settings.model) == (
        8123,
        ["ws://a:1", "ws://b:2"],
        "secret",
        "/models/m",
    )
    assert settings.device == "cuda:1"
    flagged = settings_from_args(build_parser().parse_args(["--port", "9", "--registry", "ws://c:3", "--token", "t"]))
    assert (flagged.port, flagged.registry, flagged.token) == (9, ["ws://c:3"], "t")
    assert "secret" not in repr(settings)


def test_node_help_lists_every_variable_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    for name in NodeSettings.model_fields:
        assert f"  {NodeSettings.environment_variable(name)}  " in help_text, name
    assert "  SWARM_NODE_PORT  " in help_text and "  SWARM_TOKEN  " in help_text


def test_a_node_lets_idle_openmp_threads_sleep_unless_told_otherwise() -> None:
    """Set before torch loads, or OpenMP never sees it; a user's own OMP_WAIT_POLICY wins."""
    program = "from swarm.node.main import prepare_threads; import os; prepare_threads(2); import torch; "
    program += "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    plain = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120)
    assert plain.stdout.split() == ["PASSIVE", "2"], plain.stderr
    told = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        timeout=120,
    )
    assert told.stdout.split()[0] == "ACTIVE", told.stderr


def test_per_client_limits_and_timeouts_reach_node_settings() -> None:
    flags = ["--max-sessions-per-client", "4", "--max-cache-share-per-client", "0.25", "--hello-timeout", "2"]
    flags += ["--max-steps-per-second-per-client", "100", "--first-step-timeout", "10", "--max-forward-tokens", "1024"]
    settings = settings_from_args(build_parser().parse_args(flags))
    assert (
        settings.max_sessions_per_client,
        settings.max_cache_share_per_client,
        settings.max_steps_per_second_per_client,
        settings.hello_timeout,
        settings.first_step_timeout,
        settings.max_forward_tokens,
    ) == (4, 0.25, 100.0, 2.0, 10.0, 1024)
    with pytest.raises(ValidationError, match="max_cache_share_per_client"):
        NodeSettings(max_cache_share_per_client=1.5)


def test_by_default_one_client_may_hold_half_of_a_node() -> None:
    """Enough for a local swarm's one client process (a gateway, a 32-session benchmark) on default nodes."""
    from swarm.node.server import client_share
    from swarm.node.sessions import ClientShare

    defaults = NodeSettings()
    assert (defaults.hello_timeout, defaults.first_step_timeout, defaults.max_steps_per_second_per_client) == (5, 30, 0)
    assert client_share(defaults) == ClientShare(sessions=32, cache_tokens=32768)
    assert client_share(NodeSettings(max_sessions=256)).sessions == 128
    assert client_share(NodeSettings(max_sessions=1)).sessions == 1
