"""The service's periodic upkeep: trim the streams, drop dead consumers, now and then sweep Urza.

Why a Redis outage is skipped rather than raised: ``/readyz`` and the
breakers already report it and trimming can wait for the next tick, while
failing here would restart (and eventually fail) a required worker over
something it cannot fix. Skipped ticks are counted
(``weatherlight.housekeeping.skipped_total``).
"""

from __future__ import annotations

from redis.exceptions import RedisError

from esper.core.logs import get_logger
from esper.core.worker import WorkerContext
from esper.weatherlight.components import LiveComponents

_log = get_logger("esper.weatherlight")


class Housekeeping:
    """One ``tick`` per housekeeping interval; every ``maintenance_every``-th also sweeps Urza."""

    def __init__(self, live: LiveComponents, *, maintenance_every: int = 10) -> None:
        self.live = live
        self.maintenance_every = max(1, maintenance_every)
        self._ticks = 0

    async def tick(self, ctx: WorkerContext | None = None) -> None:
        client = self.live.service_client
        try:
            if client is None:
                raise ConnectionError("oona is not connected")
            report = await client.housekeeping()
        except (RedisError, OSError) as exc:
            self.live.housekeeping_skipped += 1
            _log.warning("weatherlight.housekeeping_skipped", error=type(exc).__name__)
        else:
            trimmed = {stream: n for stream, n in report.trimmed.items() if n}
            if trimmed or report.consumers_removed:
                _log.info("weatherlight.trimmed", consumers_removed=report.consumers_removed, **trimmed)
        if ctx is not None:
            ctx.progress()
        self._ticks += 1
        library = self.live.library
        if library is not None and self._ticks % self.maintenance_every == 0:
            swept = await library.amaintenance()
            _log.info("weatherlight.urza_maintenance", report=str(swept))
