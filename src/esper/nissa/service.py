"""The Nissa service: bus telemetry in, Prometheus series and alerts out.

``NissaService`` subscribes in group ``nissa`` to three streams:

* ``oona.telemetry`` - TelemetryPackets: every metric point becomes a gauge
  (source and instance as labels, see :mod:`esper.nissa.metrics`) and is fed
  to the :class:`~esper.nissa.alerts.AlertEngine`;
* ``oona.normal`` - SystemStatePackets, FieldReports and AdaptationCommands,
  each counted;
* ``oona.emergency`` - whatever was published at HIGH/CRITICAL priority
  (telemetry, states, ...), handled exactly like on the other streams
  (esper-lite v1 never read it).

Entries that fail verification (signature, envelope, type, freshness,
replay) never reach Nissa: Oona dead-letters them with a reason. A
well-signed message that Nissa cannot make sense of (a payload that does
not parse, an unknown enum value) is logged, counted in
``esper_nissa_handler_errors_total{stream,type}`` and acked: every handler
here is pure in-memory bookkeeping, so a retry would fail the same way (and
handling a message twice only re-sets gauges; counters may count it twice).

Series derived from the bus are kept within limits (series count, distinct
values per label; see :mod:`esper.nissa.series`), so a flood of invented
sources costs a counter, not memory or a stalled ``/metrics``.

HTTP (``HealthServer``): ``/metrics`` (Prometheus text: the platform series
plus Nissa's own Oona metrics), ``/livez``, ``/readyz`` (subscribed, the
bus reports no problem and Redis answers), ``/healthz`` (JSON
``{"status": "ok", ...}``) and ``/alerts`` (JSON list of firing alerts).

Run as a worker: ``await service.run(ctx)`` binds the HTTP server, runs the
three subscriptions as children and, once ``ctx.stopping`` is set, lets each
finish its batch before closing the server.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as PyCounter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any

from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter

from esper.core.http_server import HealthServer
from esper.core.logs import get_logger
from esper.core.untrusted import bounded
from esper.core.worker import WorkerContext, run_children, unwrap
from esper.leyline import leyline_pb2
from esper.nissa.alerts import DEFAULT_RULES, ActiveAlert, AlertEngine, AlertRule
from esper.nissa.metrics import TelemetryMetrics, packet_labels
from esper.nissa.series import SeriesLimits
from esper.oona import OonaClient, OonaMessage, Subscription

_L = leyline_pb2
_log = get_logger("esper.nissa")
#: Wire values in log lines: label values as long as an alert needs to name them, error texts longer.
_LABEL_LIMIT = 80
_ERROR_LIMIT = 300

NISSA_GROUP = "nissa"
DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 9100

#: Message types Nissa understands, on whichever stream they arrive.
HANDLED_TYPES: frozenset[int] = frozenset(
    {
        _L.BUS_MESSAGE_TYPE_TELEMETRY,
        _L.BUS_MESSAGE_TYPE_SYSTEM_STATE,
        _L.BUS_MESSAGE_TYPE_FIELD_REPORT,
        _L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND,
    }
)
_OTHER_TYPES = (
    frozenset(v for v in _L.BusMessageType.values() if v != _L.BUS_MESSAGE_TYPE_UNSPECIFIED) - HANDLED_TYPES
)


class NissaService:
    """Consumes the three streams into ``registry`` and serves it over HTTP.

    The service does not close ``client``.
    """

    def __init__(
        self,
        client: OonaClient,
        *,
        registry: CollectorRegistry | None = None,
        rules: tuple[AlertRule, ...] = DEFAULT_RULES,
        limits: SeriesLimits | None = None,
        http_host: str = DEFAULT_HTTP_HOST,
        http_port: int = DEFAULT_HTTP_PORT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        # Share the client's registry so /metrics also shows Nissa's own consumers
        # (``oona_*``); platform series are all ``esper_*``, so names never collide.
        self.registry = registry if registry is not None else client.metrics.registry
        self.metrics = TelemetryMetrics(self.registry, limits)
        self.alerts = AlertEngine(rules=rules, clock=clock)
        self.handler_errors = Counter(
            "esper_nissa_handler_errors",
            "Well-signed messages Nissa could not interpret (logged and acked)",
            ["stream", "type"],
            registry=self.registry,
        )
        self.alerts_fired = Counter(
            "esper_nissa_alerts_fired", "Alerts that started firing", ["rule"], registry=self.registry
        )
        self.handled: PyCounter[str] = PyCounter()
        self.errors: PyCounter[str] = PyCounter()
        self.http = HealthServer(http_host, http_port, registry=self.registry, logger=_log)
        self.http.add_json_route("/healthz", self.health)
        self.http.add_json_route("/alerts", self.active_alerts)
        self.http.add_check("subscriptions", self._subscribed)
        self.http.add_check("bus", self._bus_ready)
        config = client.config
        self.streams = tuple(
            dict.fromkeys((config.telemetry_stream, config.normal_stream, config.emergency_stream))
        )
        policy = replace(client.config.delivery, batch=100)
        self.subscriptions: dict[str, Subscription] = {
            stream: client.subscribe(
                stream,
                NISSA_GROUP,
                self._handler_for(stream),
                types=HANDLED_TYPES,
                ignore_types=_OTHER_TYPES,
                policy=policy,
            )
            for stream in self.streams
        }
        self._listeners: list[Callable[[str, int], None]] = []
        self._ctx: WorkerContext | None = None
        self.started_at = 0.0

    # -- running -----------------------------------------------------------------------

    async def run(self, ctx: WorkerContext) -> None:
        """Serve and consume until ``ctx.stopping``; started once listening and subscribed."""
        await self.http.start()
        self.started_at = time.time()
        self._ctx = ctx
        try:
            async with asyncio.TaskGroup() as group:
                subscribed = group.create_task(
                    run_children(ctx, {stream: sub.run for stream, sub in self.subscriptions.items()})
                )
                announced = group.create_task(ctx.wait_started())
                await asyncio.wait({subscribed, announced}, return_when=asyncio.FIRST_COMPLETED)
                if announced.done():
                    _log.info(
                        "nissa ready",
                        streams=list(self.streams),
                        consumer=self.client.config.instance,
                        http=self.http.url,
                    )
                announced.cancel()
        except BaseExceptionGroup as failure:
            raise unwrap(failure) from None
        finally:
            _log.info("nissa stopping")
            await self.http.stop()

    @property
    def port(self) -> int:
        return self.http.port

    def add_listener(self, listener: Callable[[str, int], None]) -> None:
        """Call ``listener(stream, message_type)`` after each message is recorded (tests, demos)."""
        self._listeners.append(listener)

    # -- handling ----------------------------------------------------------------------

    def _handler_for(self, stream: str) -> Callable[[OonaMessage], Awaitable[None]]:
        async def handle(message: OonaMessage) -> None:
            try:
                self.record(message)
            except (DecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                kind = _type_label(message.message_type)
                self.errors[kind] += 1
                self.handler_errors.labels(stream=stream, type=kind).inc()
                _log.warning(
                    "nissa.uninterpretable_message",
                    stream=stream,
                    entry_id=bounded(message.entry_id),
                    type=kind,
                    error=bounded(f"{type(exc).__name__}: {exc}", _ERROR_LIMIT),
                )
            for listener in self._listeners:
                listener(stream, message.message_type)

        return handle

    def record(self, message: OonaMessage) -> None:
        """Turn one verified message into series; raises on a payload it cannot parse."""
        kind = message.message_type
        sender = message.attributes.get("source", "")
        if kind == _L.BUS_MESSAGE_TYPE_TELEMETRY:
            packet = message.decode(_L.TelemetryPacket)
            samples = self.metrics.record_telemetry(packet, sender)
            source, instance = packet_labels(packet, sender)
            for alert in self.alerts.observe(source, samples, instance):
                self.alerts_fired.labels(rule=alert.rule).inc()
                _log.warning(
                    "nissa.alert_firing",
                    rule=alert.rule,
                    source=bounded(alert.source, _LABEL_LIMIT),
                    instance=bounded(alert.instance, _LABEL_LIMIT),
                    metric=bounded(alert.metric),
                    value=alert.value,
                    severity=alert.severity,
                )
        elif kind == _L.BUS_MESSAGE_TYPE_SYSTEM_STATE:
            self.metrics.record_state(message.decode(_L.SystemStatePacket), sender)
        elif kind == _L.BUS_MESSAGE_TYPE_FIELD_REPORT:
            self.metrics.record_field_report(message.decode(_L.FieldReport), sender)
        elif kind == _L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND:
            self.metrics.record_command(message.decode(_L.AdaptationCommand), sender)
        else:  # pragma: no cover - the consumers only hand over HANDLED_TYPES
            return
        self.handled[_type_label(kind)] += 1

    # -- HTTP views --------------------------------------------------------------------

    def active_alerts(self) -> list[dict[str, Any]]:
        return [_alert_view(alert) for alert in self.alerts.active()]

    def health(self) -> dict[str, Any]:
        problems = self.client.problems()
        subscribed = self._ctx is not None and self._ctx.is_started
        return {
            "status": "ok" if subscribed and not problems else "degraded",
            "subscribed": subscribed,
            "problems": problems,
            "streams": list(self.streams),
            "consumer": self.client.config.instance,
            "group": NISSA_GROUP,
            "consume_breaker": int(self.client.consume_breaker.state),
            "handled": dict(self.handled),
            "handler_errors": dict(self.errors),
            "alerts_active": len(self.alerts.active()),
            "series": self.metrics.store.series_count,
            "uptime_s": round(time.time() - self.started_at, 3) if self.started_at else 0.0,
        }

    async def _subscribed(self) -> tuple[bool, str]:
        ready = self._ctx is not None and self._ctx.is_started and not self._ctx.stopping.is_set()
        return ready, "" if ready else "not subscribed"

    async def _bus_ready(self) -> tuple[bool, str]:
        problem = await self.client.probe()
        problems = self.client.problems() + ([problem] if problem else [])
        return not problems, "; ".join(problems)


def _type_label(message_type: int) -> str:
    try:
        return _L.BusMessageType.Name(message_type).removeprefix("BUS_MESSAGE_TYPE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(message_type)


def _alert_view(alert: ActiveAlert) -> dict[str, Any]:
    return asdict(alert)
