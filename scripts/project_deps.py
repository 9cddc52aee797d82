"""Print tunex's requirements from pyproject.toml, one per line: ``[project] dependencies`` and the
optional-dependency groups named on the command line (``python scripts/project_deps.py test serve``).

scripts/setup.sh installs them before building tunex itself, so pip's download progress and cargo's
build progress each show on their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: setup.sh installs tomli first
    import tomli as tomllib


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"error: {pyproject}: no optional-dependencies group {unknown}; groups: {sorted(optional)}")
    found = list(project.get("dependencies", []))
    for extra in extras:
        found += [r for r in optional[extra] if r not in found]
    return found


if __name__ == "__main__":
    print("\n".join(requirements(Path(__file__).resolve().parents[1] / "pyproject.toml", sys.argv[1:])))
