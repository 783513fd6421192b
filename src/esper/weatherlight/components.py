"""The components the workers' current attempts have built, as health, metrics and status see them.

Why one shared record: every worker builds its components afresh on each
attempt (a restart never reuses what made its predecessor fail), while the
readers (``/readyz``, ``/status``, telemetry, ``/metrics``) must always see
whatever is current. Each worker body puts here what it built and takes its
Oona client back out when its attempt ends, so a reader never reports on a
closed client.
"""

from __future__ import annotations

from collections import Counter as Tally

from esper.kasmina.warmer import KernelWarmer
from esper.oona import OonaClient
from esper.tamiyo.service import TamiyoService
from esper.urza import UrzaLibrary
from esper.urza.prefetch import UrzaPrefetchWorker


class LiveComponents:
    """What is running now; ``instance`` is this replica's consumer name once known."""

    def __init__(self, instance: str | None) -> None:
        #: This replica's consumer name in every group (``OONA_CONSUMER_NAME`` or a leased slot).
        self.instance = instance
        #: The current Oona client of each role (``service``, ``prefetch``, ``kasmina``, ...).
        self.clients: dict[str, OonaClient] = {}
        self.library: UrzaLibrary | None = None
        self.prefetch: UrzaPrefetchWorker | None = None
        self.warmer: KernelWarmer | None = None
        self.tamiyo: TamiyoService | None = None
        #: Messages read from the emergency stream, by type.
        self.emergencies: Tally[str] = Tally()
        #: Housekeeping ticks that could not reach Redis.
        self.housekeeping_skipped = 0

    @property
    def service_client(self) -> OonaClient | None:
        """The service's own client (telemetry, housekeeping, the Redis probe), while connected."""
        return self.clients.get("service")

    def need_library(self) -> UrzaLibrary:
        if self.library is None:
            raise RuntimeError("the Urza library is not open")
        return self.library

    def breaker_states(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for client in list(self.clients.values()):
            states[client.publish_breaker.name] = int(client.publish_breaker.state)
            states[client.consume_breaker.name] = int(client.consume_breaker.state)
        return states

    def metrics(self) -> dict[str, float]:
        """Every component's counters under one flat namespace (telemetry and ``/status``)."""
        metrics: dict[str, float] = {}
        service = self.service_client
        if service is not None:
            metrics.update({f"oona.{k}": v for k, v in service.metrics_snapshot().items()})
        if self.library is not None:
            for key, value in self.library.metrics_snapshot().items():
                if isinstance(value, int | float):
                    metrics[f"urza.library.{key}"] = float(value)
        if self.prefetch is not None:
            metrics.update({f"urza.{k}": v for k, v in self.prefetch.metrics_snapshot().items()})
        if self.warmer is not None:
            metrics.update(self.warmer.metrics_snapshot())
        if self.tamiyo is not None:
            metrics.update(
                {f"tamiyo.service.{k}": float(v) for k, v in self.tamiyo.metrics_snapshot().items()}
            )
        metrics.update({f"weatherlight.emergency.{k}": float(v) for k, v in self.emergencies.items()})
        metrics["weatherlight.housekeeping.skipped_total"] = float(self.housekeeping_skipped)
        return metrics
