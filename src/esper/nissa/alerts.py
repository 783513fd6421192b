"""Threshold alerts over the metric names the platform really emits.

A rule matches metric names by shell-style pattern (``oona.pending.*``), so
one rule covers every stream or worker. An alert fires after ``for_count``
consecutive breaches of the same series and clears on the first sample back
under the threshold; each (rule, source, instance, metric) is tracked
separately so one noisy worker, or one replica, cannot mask another. Nissa
feeds it only samples that became series, so its state stays within the
series limits.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    pattern: str
    threshold: float
    for_count: int = 1
    severity: str = "warning"
    summary: str = ""

    def matches(self, metric: str) -> bool:
        return fnmatch.fnmatchcase(metric, self.pattern)


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        "training_latency_high",
        "tolaria.training.latency_ms",
        threshold=18.0 * 1000,
        for_count=3,
        summary="an epoch of training took longer than 18 s three times in a row",
    ),
    AlertRule(
        "kasmina_isolation_violation",
        "kasmina.isolation.violations",
        threshold=0.0,
        for_count=1,
        severity="critical",
        summary="a seed leaked gradient into its host",
    ),
    AlertRule(
        "oona_pending_depth_high",
        "oona.pending.*",
        threshold=4000.0,
        for_count=2,
        summary="a consumer group is falling behind",
    ),
    AlertRule(
        "oona_dead_letters",
        "oona.deadletter.total",
        threshold=0.0,
        for_count=1,
        summary="messages were rejected to the dead letter stream",
    ),
    AlertRule(
        "oona_trimmed_unread",
        "oona.trimmed_unread.total",
        threshold=0.0,
        for_count=1,
        severity="critical",
        summary="entries were trimmed before a consumer group had read them",
    ),
    AlertRule(
        "weatherlight_worker_restarts",
        "weatherlight.worker.*.restarts",
        threshold=3.0,
        for_count=1,
        summary="a supervised worker keeps restarting",
    ),
)


@dataclass(slots=True)
class ActiveAlert:
    rule: str
    source: str
    instance: str
    metric: str
    value: float
    severity: str
    summary: str
    since: float


@dataclass
class AlertEngine:
    """Evaluates samples against rules and keeps the set of firing alerts."""

    rules: tuple[AlertRule, ...] = DEFAULT_RULES
    clock: Callable[[], float] = time.time
    _streaks: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    _active: dict[tuple[str, str, str, str], ActiveAlert] = field(default_factory=dict)
    fired_total: int = 0

    def observe(
        self, source: str, samples: Iterable[tuple[str, float]], instance: str = ""
    ) -> list[ActiveAlert]:
        """Feed one packet's samples; return alerts that started firing now."""
        started: list[ActiveAlert] = []
        for metric, value in samples:
            for rule in self.rules:
                if not rule.matches(metric):
                    continue
                key = (rule.name, source, instance, metric)
                if value > rule.threshold:
                    streak = self._streaks.get(key, 0) + 1
                    self._streaks[key] = streak
                    if streak >= rule.for_count and key not in self._active:
                        alert = ActiveAlert(
                            rule.name,
                            source,
                            instance,
                            metric,
                            value,
                            rule.severity,
                            rule.summary,
                            self.clock(),
                        )
                        self._active[key] = alert
                        self.fired_total += 1
                        started.append(alert)
                    elif key in self._active:
                        self._active[key].value = value
                else:
                    self._streaks.pop(key, None)
                    self._active.pop(key, None)
        return started

    def active(self) -> list[ActiveAlert]:
        return sorted(self._active.values(), key=lambda a: (a.rule, a.source, a.instance, a.metric))
