"""Every command answers `--help` in under a second: heavy libraries load only when a command runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

COMMANDS = {
    "swarm-registry": "swarm.registry.main",
    "swarm-node": "swarm.node.main",
    "swarm-client": "swarm.client.cli.main",
    "swarm-demo": "swarm.client.cli.demo",
}
HEAVY = ("torch", "transformers", "numpy", "safetensors", "fastapi", "uvicorn", "websockets", "msgpack")


@pytest.mark.parametrize(("command", "module"), COMMANDS.items())
def test_help_imports_no_heavy_library(command: str, module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and f"usage: {command}" in result.stdout, result.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")
    }
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("argv", [["swarm-registry"], ["swarm-node"], ["swarm-client"], ["swarm-client", "serve"]])
def test_help_answers_in_under_a_second(argv: list[str]) -> None:
    executable = shutil.which(argv[0])
    assert executable is not None, f"{argv[0]} is not installed: pip install -e ."
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([executable, *argv[1:], "--help"], capture_output=True, check=True, timeout=60)
        times.append(time.perf_counter() - start)
    assert sorted(times)[1] < 1.0, f"median of 3: {sorted(times)[1]:.2f} s"
