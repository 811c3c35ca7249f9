"""Imports point one way: node -> shared core <- client, checked by import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_layering", REPO / "scripts" / "check_layering.py")
assert _spec is not None and _spec.loader is not None
check_layering = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layering)


@pytest.fixture
def installed_layout(tmp_path: Path) -> Path:
    check_layering.assemble_installed_layout(REPO, tmp_path)
    return tmp_path


def test_the_installed_layout_has_node_and_client_inside_swarm(installed_layout: Path) -> None:
    assert (installed_layout / "swarm" / "protocol.py").is_file()
    assert (installed_layout / "swarm" / "node" / "server.py").is_file()
    assert (installed_layout / "swarm" / "client" / "core" / "failover.py").is_file()


def test_every_layering_contract_is_kept(installed_layout: Path) -> None:
    result = check_layering.check_layering(installed_layout, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


NODE_CLIENT_APART = "the node and the client never import each other"
ONLY_NODE_IMPORTS_NODE = "nothing outside the node imports the node (the shared core stays below it)"
ONLY_CLIENT_IMPORTS_CLIENT = "nothing outside the client imports the client (the shared core stays below it)"


@pytest.mark.parametrize(
    ("importer", "line", "broken"),
    [
        # Both sides import the core, so a core module importing one side joins the other side to it as well.
        ("swarm/protocol.py", "import swarm.client.core.model", {ONLY_CLIENT_IMPORTS_CLIENT, NODE_CLIENT_APART}),
        ("swarm/memory.py", "from swarm.node import server", {ONLY_NODE_IMPORTS_NODE, NODE_CLIENT_APART}),
        ("swarm/node/steps.py", "import swarm.client.core.links", {ONLY_CLIENT_IMPORTS_CLIENT, NODE_CLIENT_APART}),
    ],
)
def test_an_import_against_the_direction_breaks_the_contract(
    installed_layout: Path, importer: str, line: str, broken: set[str]
) -> None:
    module = installed_layout / importer
    module.write_text(module.read_text() + f"\n{line}\n")
    result = check_layering.check_layering(installed_layout, REPO / "pyproject.toml")
    assert result.returncode != 0
    verdicts = dict(
        verdict.rsplit(" ", 1) for verdict in result.stdout.splitlines() if verdict.endswith((" KEPT", " BROKEN"))
    )
    assert {name for name, verdict in verdicts.items() if verdict == "BROKEN"} == broken, result.stdout
