"""Weatherlight's own ``/metrics`` series, computed at scrape time from live state.

Why collectors instead of gauges set as things happen: a gauge set on a
state change is stale the moment a change is missed; reading the
supervisor's snapshot at scrape time cannot be.

- ``esper_weatherlight_worker_up{worker}``: 1 while the worker runs and has
  reported ``ctx.started()``, else 0;
- ``esper_weatherlight_worker_restarts_total{worker}``: restarts so far;
- ``esper_weatherlight_worker_backoff_seconds{worker}``: the delay being
  waited before the next attempt (0 when not backing off);
- ``esper_weatherlight_breaker_state{breaker}``: Leyline ``CircuitBreakerState``
  numbers: 1 closed, 2 open, 3 half-open (0 unknown).

Components that register their own collectors (the Urza library, the
prefetch worker) are rebuilt on every attempt, each with a fresh registry;
:class:`AttemptRegistries` serves the current ones through the service's
registry, so a restart never collides with the series of its predecessor
(their counters restart from zero, as after a process restart).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class SupervisorCollector(Collector):
    def __init__(
        self, snapshot: Callable[[], Mapping[str, Any]], breakers: Callable[[], Mapping[str, int]]
    ) -> None:
        self._snapshot = snapshot
        self._breakers = breakers

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to pre-declare

    def collect(self) -> Iterator[Metric]:
        workers = self._snapshot()["workers"]
        up = GaugeMetricFamily(
            "esper_weatherlight_worker_up", "1 while the worker runs and has started", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "esper_weatherlight_worker_restarts", "Restarts of the worker", labels=["worker"]
        )
        backoff = GaugeMetricFamily(
            "esper_weatherlight_worker_backoff_seconds",
            "Delay being waited before the worker's next attempt",
            labels=["worker"],
        )
        for worker in workers:
            name = [str(worker["name"])]
            up.add_metric(name, 1.0 if worker["status"] == "running" else 0.0)
            restarts.add_metric(name, float(worker["restarts"]))
            backoff.add_metric(name, float(worker["backoff_seconds"]))
        breakers = GaugeMetricFamily(
            "esper_weatherlight_breaker_state",
            "Circuit breaker state (Leyline CircuitBreakerState: 1 closed, 2 open, 3 half-open)",
            labels=["breaker"],
        )
        for breaker, state in sorted(self._breakers().items()):
            breakers.add_metric([breaker], float(state))
        yield from (up, restarts, backoff, breakers)


class AttemptRegistries(Collector):
    """Serves the registries of the components' current attempts (see the module docstring)."""

    def __init__(self) -> None:
        self._current: dict[str, CollectorRegistry] = {}

    def fresh(self, owner: str) -> CollectorRegistry:
        """A new registry for ``owner``'s attempt, replacing its previous one."""
        registry = CollectorRegistry(auto_describe=True)
        self._current[owner] = registry
        return registry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for registry in list(self._current.values()):
            yield from registry.collect()
