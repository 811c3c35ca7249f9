"""`swarm-node` flags and `SWARM_*` variables reach `NodeSettings`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from node.main import build_parser, settings_from_args
from node.settings import NodeSettings


def test_prefill_chunk_flag_reaches_node_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert NodeSettings().prefill_chunk == 256
    assert settings_from_args(build_parser().parse_args([])).prefill_chunk == 256
    assert settings_from_args(build_parser().parse_args(["--prefill-chunk", "3"])).prefill_chunk == 3
    assert settings_from_args(build_parser().parse_args(["--prefill-chunk", "0"])).prefill_chunk == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "--prefill-chunk N" in capsys.readouterr().out


def test_prefill_chunk_comes_from_the_environment_and_must_not_be_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_PREFILL_CHUNK", "64")
    assert NodeSettings().prefill_chunk == 64
    with pytest.raises(ValidationError, match="prefill_chunk"):
        NodeSettings(prefill_chunk=-1)
