"""Metric names out of PromQL expressions, and out of the alert rules and dashboards that hold them.

Not a PromQL parser: it removes what cannot contain a metric name (strings,
label matchers, ranges, grouping label lists, Grafana variables), then keeps
every identifier that is not a function call, a keyword or part of a number
or duration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
    | {"offset", "inf", "nan", "atan2"}
)

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "infra" / "grafana").glob("*.json"))


def metric_names(expr: str) -> set[str]:
    text = _VARIABLE.sub("1", expr)
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        following = text[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or following.startswith("("):
            continue
        names.add(word)
    return names


def rule_expressions(path: Path = ALERTS) -> Iterator[tuple[str, str]]:
    """(alert or record name, expression) of every rule."""
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def panel_expressions(path: Path) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every query in a Grafana dashboard, rows included."""
    dashboard: dict[str, Any] = json.loads(path.read_text())

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", ()):
                if target.get("expr"):
                    yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])


def referenced() -> dict[str, set[str]]:
    """Metric name -> where it is used (``alert X`` / ``panel Y``)."""
    found: dict[str, set[str]] = {}
    for alert, expr in rule_expressions():
        for name in metric_names(expr):
            found.setdefault(name, set()).add(f"alert {alert}")
    for path in DASHBOARDS:
        for title, expr in panel_expressions(path):
            for name in metric_names(expr):
                found.setdefault(name, set()).add(f"panel {title!r} ({path.name})")
    return found
