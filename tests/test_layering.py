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
    {"weatherlight", "demo"},
]
RANK = {name: index for index, layer in enumerate(LAYERS) for name in layer}
# Within the second layer security must not depend on core (and vice versa).
SAME_LAYER_ALLOWED: set[tuple[str, str]] = set()


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
