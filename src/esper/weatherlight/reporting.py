"""What the running service says about itself: its health verdict, ``/status`` and its telemetry.

Why together: ``/readyz``, ``/status``, the telemetry packet and the systemd
watchdog must all tell the same truth, so each of them asks :meth:`health`
(the one verdict, see :mod:`esper.weatherlight.health`) over the same
supervisor snapshot and the same live components.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from esper.core.logs import get_logger
from esper.core.settings import EsperSettings
from esper.core.telemetry import indicated_priority, stamp_instance
from esper.core.worker import WorkerContext
from esper.leyline import leyline_pb2
from esper.weatherlight.components import LiveComponents
from esper.weatherlight.health import UNHEALTHY, Health, bus_problems, judge, probe_catalog, probe_redis
from esper.weatherlight.supervisor import Supervisor
from esper.weatherlight.telemetry import build_weatherlight_packet

_log = get_logger("esper.weatherlight")


class Reporting:
    """Health, status and telemetry over one supervisor and its live components."""

    def __init__(self, settings: EsperSettings, supervisor: Supervisor, live: LiveComponents) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.live = live
        #: The last verdict, for ``/status`` (which must not probe on every scrape).
        self.last_health: Health | None = None

    # -- health --------------------------------------------------------------------

    async def health(self) -> Health:
        """The one verdict for ``/readyz``, telemetry and the systemd watchdog (see ``health.py``)."""
        service = self.live.service_client
        redis, catalog = await asyncio.gather(probe_redis(service), probe_catalog(self.live.library))
        health = judge(
            self.supervisor.snapshot(),
            redis=redis,
            catalog=catalog,
            bus=bus_problems(self.live.clients),
            breakers=self.live.breaker_states(),
        )
        self.last_health = health
        return health

    async def readiness(self) -> Sequence[tuple[str, bool, str]]:
        """The ``/readyz`` checks."""
        return [(c.name, c.ok, c.detail) for c in (await self.health()).checks]

    async def serving(self) -> bool:
        """Whether the systemd watchdog may be pinged."""
        return (await self.health()).status != UNHEALTHY

    def status(self) -> Mapping[str, Any]:
        """The ``/status`` document: the supervisor's snapshot with this replica's components."""
        snapshot = dict(self.supervisor.snapshot())
        snapshot["instance"] = self.live.instance
        snapshot["health"] = self.last_health.view() if self.last_health is not None else None
        snapshot["breakers"] = self.live.breaker_states()
        snapshot["redis"] = "external" if self.settings.redis_url is not None else "embedded"
        snapshot["components"] = self.live.metrics()
        tamiyo = self.live.tamiyo
        snapshot["tamiyo"] = {
            "policy_version": tamiyo.controller.policy_version if tamiyo is not None else None
        }
        return snapshot

    # -- telemetry -----------------------------------------------------------------

    async def publish_telemetry(self, ctx: WorkerContext | None = None) -> None:
        """Publish the service packet and Oona's, then forward Kasmina's at their own priority."""
        # A packet sent while later boot steps still start would report the service down
        # ("workers: booting") though nothing is wrong: the first one waits for the end of boot.
        await self.supervisor.wait_booted()
        client = self.live.service_client
        if client is None:
            _log.warning("weatherlight.telemetry_skipped", reason="oona is not connected")
            return
        health = await self.health()
        packet = build_weatherlight_packet(
            self.supervisor.snapshot(),
            health,
            breaker_states=self.live.breaker_states(),
            extra_metrics=self.live.metrics(),
        )
        # Only a required path down is urgent (emergency stream); degraded is routine.
        urgent = health.status == UNHEALTHY
        priority = leyline_pb2.MESSAGE_PRIORITY_HIGH if urgent else leyline_pb2.MESSAGE_PRIORITY_NORMAL
        # Every packet names this replica, so Nissa keeps the replicas' series apart.
        instance = client.config.instance
        results = [
            await client.publish_telemetry(stamp_instance(packet, instance), priority=priority),
            await client.publish_telemetry(stamp_instance(client.metrics_packet(), instance)),
        ]
        warmer = self.live.warmer
        if warmer is not None:
            for forwarded in warmer.drain_telemetry():
                results.append(
                    await client.publish_telemetry(
                        stamp_instance(forwarded, instance), priority=indicated_priority(forwarded)
                    )
                )
        failed = [r.reason for r in results if not r.ok]
        if failed:
            _log.warning(
                "weatherlight.telemetry_not_published", count=len(failed), reasons=sorted(set(failed))
            )
