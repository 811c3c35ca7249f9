"""Print the ends of the transformers range pyproject.toml declares, as pip requirements.

`python scripts/transformers_bounds.py lowest` prints `transformers==5.20.0`: the lowest release the range
admits, which CI tests beside the newest. `range` prints the declared requirement itself, which CI installs with
`--upgrade` so the suite runs on the newest release even where an older one in the range is installed. The
range is read, never repeated, so raising a bound is a change to pyproject.toml alone.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def transformers_requirement(pyproject: Path) -> Requirement:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for dependency in dependencies:
        requirement = Requirement(dependency)
        if requirement.name == "transformers":
            return requirement
    raise SystemExit(f"{pyproject} declares no transformers dependency")


def lowest_release(requirement: Requirement) -> Version:
    """The `>=` bound: the lowest release the range admits (the range must have one)."""
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    if not floors:
        raise SystemExit(f"{requirement} has no lower bound (>=); CI tests both ends, so declare one")
    return max(floors)


def main(argv: list[str]) -> int:
    if argv not in (["lowest"], ["range"]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    requirement = transformers_requirement(Path(__file__).resolve().parent.parent / "pyproject.toml")
    print(f"transformers=={lowest_release(requirement)}" if argv == ["lowest"] else requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
