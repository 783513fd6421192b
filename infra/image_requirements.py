"""Print the requirements an image installs, read from pyproject.toml's [project] dependencies.

The control plane (Weatherlight, Nissa, esper-oona, esper-config) never
imports torch, nor the demo's scikit-learn and matplotlib, so the default
image leaves them out and installs the project itself with ``--no-deps``;
``--forge`` prints just those, for the image that runs ``esper-forge``,
trainers and the demo.

    python infra/image_requirements.py pyproject.toml [--forge]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

#: Distributions only the forge, the trainers and the demo import.
FORGE_ONLY = frozenset({"torch", "scikit-learn", "matplotlib"})


def distribution(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, *, forge: bool) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return [r for r in project["dependencies"] if (distribution(r) in FORGE_ONLY) == forge]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--forge", action="store_true", help="only what the forge image adds")
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{r}\n" for r in requirements(args.pyproject, forge=args.forge)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
