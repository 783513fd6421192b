"""Nissa: bus telemetry into Prometheus series and threshold alerts.

Public API::

    service = NissaService(client)            # client: OonaClient in group "nissa"
    await service.run(ctx)                    # consumes telemetry/normal/emergency, serves HTTP

Series are labelled ``source`` and ``instance`` and kept within ``SeriesLimits``.

Console script ``esper-nissa-service`` (:func:`esper.nissa.cli.main`).
"""

from esper.nissa.alerts import DEFAULT_RULES, ActiveAlert, AlertEngine, AlertRule
from esper.nissa.metrics import TelemetryMetrics, sanitize_metric_name
from esper.nissa.series import SeriesLimits, SeriesStore
from esper.nissa.service import HANDLED_TYPES, NISSA_GROUP, NissaService

__all__ = [
    "DEFAULT_RULES",
    "HANDLED_TYPES",
    "NISSA_GROUP",
    "ActiveAlert",
    "AlertEngine",
    "AlertRule",
    "NissaService",
    "SeriesLimits",
    "SeriesStore",
    "TelemetryMetrics",
    "sanitize_metric_name",
]
