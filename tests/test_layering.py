"""Package layers stay acyclic: a subsystem imports only layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "esper"
LAYERS = [
    {"leyline"},
    {"core", "security"},
    {"oona"},
    {"karn", "tezzeret", "urza"},
    {"kasmina", "tamiyo", "nissa", "tolaria", "simic"},
    {"weatherlight", "grow"},
    {"demo"},
]
RANK = {name: index for index, layer in enumerate(LAYERS) for name in layer}
# Imports allowed inside one layer: the forge builds on the catalog and the
# library. Keep this graph acyclic (checked below); core and security never
# import each other.
SAME_LAYER_ALLOWED: set[tuple[str, str]] = {("tezzeret", "karn"), ("tezzeret", "urza")}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name.split(".")[1] for name in found if name.startswith("esper.") and name.count(".") >= 1}


SUBSYSTEMS = sorted(p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("_"))


def test_every_subsystem_has_a_layer() -> None:
    assert set(SUBSYSTEMS) <= set(RANK), set(SUBSYSTEMS) - set(RANK)


@pytest.mark.parametrize("subsystem", SUBSYSTEMS)
def test_subsystem_imports_only_lower_layers(subsystem: str) -> None:
    offenders = []
    for path in (SRC / subsystem).rglob("*.py"):
        for target in _imports(path):
            if target == subsystem:
                continue
            if RANK[target] >= RANK[subsystem] and (subsystem, target) not in SAME_LAYER_ALLOWED:
                offenders.append(f"{path.relative_to(SRC)} imports esper.{target}")
    assert not offenders, offenders


def test_same_layer_allowances_are_acyclic() -> None:
    for source, target in SAME_LAYER_ALLOWED:
        assert RANK[source] == RANK[target]
        assert (target, source) not in SAME_LAYER_ALLOWED
