"""Nissa's bus-derived series, kept within limits.

Why limits: every label value Nissa exposes comes off the wire (a packet's
source, the instance that published it, a training run id) and so does every
metric name. A publisher that invents values (a bug, a misconfigured fleet, a
hostile peer holding the secret) would otherwise grow ``/metrics`` without
bound and stall the event loop while it renders. :class:`SeriesLimits`:

- ``max_series`` (10 000): every bus-derived series together;
- ``max_label_values`` (1 000): distinct values of any one label name
  (``source``, ``instance``, ``run``, ...) across all series;
- ``max_value_length`` (128): longer label values are cut to this length;
- ``max_name_length`` (200): a platform metric with a longer name is dropped;
- ``idle_ttl_s`` (86 400): a series not updated for this long is forgotten,
  which frees its label values (training runs come and go; a replica that
  is gone stops holding room). Its counter restarts from zero if it returns,
  which Prometheus' ``rate`` treats as a reset.

A sample that would exceed a limit is dropped, counted in
``esper_nissa_dropped_samples_total{reason,label}`` (reasons:
``label_values``, ``series_limit``, ``name_too_long``, ``name_collision``)
and logged at most once per ``log_every_s`` per reason and label, with the
number dropped since the previous line. ``esper_nissa_series`` and
``esper_nissa_series_limit`` show the headroom.

The store renders its series itself at scrape time (it is a registry
collector), so a forgotten series disappears from ``/metrics`` at once.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from esper.core.logs import get_logger

_log = get_logger("esper.nissa.series")

Kind = Literal["counter", "gauge"]
#: Names of Nissa's own series; a platform metric can never take one.
OWN_PREFIX = "esper_nissa_"


@dataclass(frozen=True, slots=True)
class SeriesLimits:
    max_series: int = 10_000
    max_label_values: int = 1_000
    max_value_length: int = 128
    max_name_length: int = 200
    idle_ttl_s: float = 86_400.0
    log_every_s: float = 60.0


class _Family:
    __slots__ = ("declared", "help", "kind", "labels", "name", "series")

    def __init__(
        self, name: str, help_text: str, kind: Kind, labels: tuple[str, ...], declared: bool
    ) -> None:
        self.name = name
        self.help = help_text
        self.kind: Kind = kind
        self.labels = labels
        self.declared = declared
        self.series: dict[tuple[str, ...], float] = {}


class SeriesStore(Collector):
    """Counters and gauges whose label values come from the bus, with the limits above.

    ``declare`` fixes a family (always shown, even empty); ``gauge`` creates
    platform-metric families on first sight. ``clock`` is monotonic seconds
    (idle expiry and log rate only; no series value comes from it).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        limits: SeriesLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or SeriesLimits()
        self._clock = clock
        self._families: dict[str, _Family] = {}
        self._reserved: set[str] = set()
        #: (family, label values) -> last update, least recently updated first.
        self._touched: OrderedDict[tuple[str, tuple[str, ...]], float] = OrderedDict()
        #: label name -> value -> number of series carrying it.
        self._values: dict[str, dict[str, int]] = {}
        self._unlogged: Tally[tuple[str, str]] = Tally()
        self._logged_at: dict[tuple[str, str], float] = {}
        self.dropped = Counter(
            "esper_nissa_dropped_samples",
            "Bus samples not turned into series because a limit was reached",
            ["reason", "label"],
            registry=registry,
        )
        self.expired = Counter(
            "esper_nissa_expired_series",
            "Bus-derived series forgotten after staying idle for the limit",
            registry=registry,
        )
        registry.register(self)

    # -- families --------------------------------------------------------------------

    def declare(self, name: str, help_text: str, kind: Kind, labels: tuple[str, ...]) -> None:
        """A fixed family of Nissa's (shown even while empty; never a platform metric's name)."""
        self._families[name] = _Family(name, help_text, kind, labels, declared=True)
        self._reserved.add(name)
        if kind == "counter":
            self._reserved.update((f"{name}_total", f"{name}_created"))

    @property
    def series_count(self) -> int:
        return len(self._touched)

    def values_of(self, label: str) -> int:
        """How many distinct values ``label`` has across all series."""
        return len(self._values.get(label, ()))

    # -- updates ---------------------------------------------------------------------

    def inc(self, name: str, values: tuple[str, ...], amount: float = 1.0) -> bool:
        """Add to a declared counter; False when the sample was dropped."""
        family = self._families[name]
        key = self._admit(family, values)
        if key is None:
            return False
        family.series[key] += amount
        return True

    def set(self, name: str, values: tuple[str, ...], value: float) -> bool:
        """Set a declared gauge; False when the sample was dropped."""
        family = self._families[name]
        key = self._admit(family, values)
        if key is None:
            return False
        family.series[key] = value
        return True

    def gauge(
        self, name: str, help_text: str, labels: tuple[str, ...], values: tuple[str, ...], value: float
    ) -> bool:
        """Set a platform-metric gauge, creating its family on first sight; False when dropped."""
        family = self._families.get(name)
        if family is None:
            if name in self._reserved or name.startswith(OWN_PREFIX):
                self.drop("name_collision", "", name)
                return False
            family = _Family(name, help_text, "gauge", labels, declared=False)
        elif family.declared or family.labels != labels:
            self.drop("name_collision", "", name)
            return False
        key = self._admit(family, values)
        if key is None:
            return False
        # (Re-)register: admitting may have expired the family's last other series and removed it.
        self._families[name] = family
        family.series[key] = value
        return True

    def _admit(self, family: _Family, values: tuple[str, ...]) -> tuple[str, ...] | None:
        """The series key for ``values`` once it fits the limits (created at 0), else None."""
        limit = self.limits.max_value_length
        if any(len(v) > limit for v in values):
            values = tuple(v[:limit] for v in values)
        touched = (family.name, values)
        now = self._clock()
        if touched in self._touched:
            self._touched.move_to_end(touched)
            self._touched[touched] = now
            return values
        self._expire(now)
        for label, value in zip(family.labels, values, strict=True):
            known = self._values.get(label)
            if known is not None and value not in known and len(known) >= self.limits.max_label_values:
                self.drop("label_values", label, value)
                return None
        if len(self._touched) >= self.limits.max_series:
            self.drop("series_limit", "", f"{family.name}{dict(zip(family.labels, values, strict=True))}")
            return None
        self._touched[touched] = now
        family.series[values] = 0.0
        for label, value in zip(family.labels, values, strict=True):
            known = self._values.setdefault(label, {})
            known[value] = known.get(value, 0) + 1
        return values

    def _expire(self, now: float) -> None:
        horizon = now - self.limits.idle_ttl_s
        while self._touched:
            (name, values), last = next(iter(self._touched.items()))
            if last > horizon:
                return
            del self._touched[(name, values)]
            family = self._families[name]
            del family.series[values]
            if not family.series and not family.declared:
                del self._families[name]
            for label, value in zip(family.labels, values, strict=True):
                known = self._values[label]
                known[value] -= 1
                if not known[value]:
                    del known[value]
            self.expired.inc()

    def drop(self, reason: str, label: str, example: str) -> None:
        """Count (and, rate-limited, log) one sample that did not become a series."""
        self.dropped.labels(reason, label).inc()
        key = (reason, label)
        self._unlogged[key] += 1
        now = self._clock()
        last = self._logged_at.get(key)
        if last is not None and now - last < self.limits.log_every_s:
            return
        self._logged_at[key] = now
        _log.warning(
            "nissa.samples_dropped",
            reason=reason,
            label=label,
            dropped=self._unlogged.pop(key),
            example=example[:80],
            max_series=self.limits.max_series,
            max_label_values=self.limits.max_label_values,
        )

    # -- rendering -------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []  # names change at run time; collisions are checked here, not by the registry

    def collect(self) -> Iterator[Metric]:
        self._expire(self._clock())
        for family in list(self._families.values()):
            metric: CounterMetricFamily | GaugeMetricFamily
            if family.kind == "counter":
                metric = CounterMetricFamily(family.name, family.help, labels=family.labels)
            else:
                metric = GaugeMetricFamily(family.name, family.help, labels=family.labels)
            for values, value in family.series.items():
                metric.add_metric(values, value)
            yield metric
        series = GaugeMetricFamily("esper_nissa_series", "Bus-derived series currently shown")
        series.add_metric([], float(len(self._touched)))
        limit = GaugeMetricFamily("esper_nissa_series_limit", "Most bus-derived series Nissa shows at once")
        limit.add_metric([], float(self.limits.max_series))
        yield from (series, limit)
