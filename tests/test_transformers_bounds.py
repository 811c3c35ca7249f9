"""`scripts/transformers_bounds.py`: CI's two ends of the transformers range, read from pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "transformers_bounds.py"


def bounds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def declared() -> Requirement:
    dependencies = tomllib.loads((SCRIPT.parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in dependencies if Requirement(d).name == "transformers")


def test_range_is_the_declared_requirement_and_lowest_its_floor() -> None:
    requirement = declared()
    assert Requirement(bounds("range").stdout.strip()) == requirement
    lowest = Requirement(bounds("lowest").stdout.strip())
    [pin] = list(lowest.specifier)
    assert pin.operator == "==" and requirement.specifier.contains(pin.version)


def test_anything_else_prints_the_usage_and_fails() -> None:
    result = bounds("newest")
    assert result.returncode == 2 and "lowest" in result.stderr
