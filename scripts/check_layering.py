"""Check the import contracts in pyproject.toml (`[tool.importlinter]`) on the installed layout.

import-linter finds a package's modules by walking its folder, but `swarm.node` and `swarm.client` live in
the top-level folders `node/` and `client/` and join `swarm` only when installed (setuptools' package-dir).
So the check copies the sources into the layout an install produces, using the mapping pyproject.toml
declares, and runs `lint-imports` there. Exit status: lint-imports' (0 when every contract is kept).

Usage: python scripts/check_layering.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def assemble_installed_layout(repo: Path, target: Path) -> None:
    """Copy every mapped package's Python sources from `repo` to where an install puts them under `target`."""
    setuptools_config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools_config["package-dir"]
    for package in setuptools_config["packages"]:
        root = max((name for name in package_dir if package == name or package.startswith(name + ".")), key=len)
        source = repo / package_dir[root] / Path(*package.split(".")[len(root.split(".")) :])
        destination = target / Path(*package.split("."))
        destination.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            shutil.copy2(module, destination / module.name)


def check_layering(sources: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports with `config` on the installed layout in `sources`."""
    env = {**os.environ, "PYTHONPATH": str(sources)}
    command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    # cwd is the layout itself: lint-imports puts the working directory first on sys.path, and the repo root
    # would offer a `swarm` package without node/ and client/ in it.
    return subprocess.run(
        [*command, "--no-cache", str(config)], cwd=sources, env=env, capture_output=True, text=True, timeout=120
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="swarm-layering-") as tmp:
        assemble_installed_layout(REPO, Path(tmp))
        result = check_layering(Path(tmp), REPO / "pyproject.toml")
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
