"""Every third-party module the package imports comes from a declared dependency.

A module that is only installed because another dependency pulls it in works
until that dependency drops it; a fresh install then fails at import time.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normal(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def _imported() -> dict[str, str]:
    """Top-level module name -> one file importing it, for every import in src/."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_a_declared_dependency() -> None:
    declared, providers = _declared(), packages_distributions()
    undeclared = {}
    for module, where in _imported().items():
        if module in sys.stdlib_module_names or module in ("esper", "__future__"):
            continue
        dists = {_normal(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported in {where}) is not installed"
        if not dists & declared:
            undeclared[module] = (where, sorted(dists))
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
