"""`swarm-registry` flags and `SWARM_REGISTRY_*` variables reach `RegistrySettings`."""

from __future__ import annotations

import pytest

from swarm.registry.main import build_parser
from swarm.registry.settings import RegistrySettings


def test_registry_settings_come_from_flags_then_its_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (RegistrySettings().host, RegistrySettings().port, RegistrySettings().token) == ("127.0.0.1", 7000, None)
    monkeypatch.setenv("SWARM_REGISTRY_PORT", "7100")
    monkeypatch.setenv("SWARM_NODE_PORT", "1")  # another process's variable
    monkeypatch.setenv("SWARM_TOKEN", "secret")
    from_env = RegistrySettings.from_flags(build_parser().parse_args([]))
    assert (from_env.port, from_env.token) == (7100, "secret")
    flagged = RegistrySettings.from_flags(build_parser().parse_args(["--port", "0", "--token", "t"]))
    assert (flagged.port, flagged.token) == (0, "t")


def test_registry_help_lists_every_variable_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    for name in RegistrySettings.model_fields:
        assert f"  {RegistrySettings.environment_variable(name)}  " in help_text, name
