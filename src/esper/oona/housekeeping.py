"""Housekeeping: trim streams without dropping what a group still needs, and account for what was lost.

Per stream, each pass (run every ``WEATHERLIGHT_HOUSEKEEPING_INTERVAL_S``):

- trims by age (``message_ttl_ms``) and length (``max_stream_length``), but
  never past an entry pending in any group, nor past an entry a *live* group
  has not read yet; a group whose consumers have all been silent for longer
  than the TTL no longer protects what it has not read (TRIM script). The
  cost is proportional to what is removed, not to the stream's length;
- counts, once, the entries each group lost unread, whether to this trim or
  to the hard cap applied at publish (COUNT_GAPS script, from the server's own
  per-group lag): ``oona_trimmed_unread_total{stream,group}`` and a warning;
- removes consumers that have been silent for a long time and hold nothing
  (a replica that is gone for good), so groups do not fill with dead names;
  never before the TTL, since that is when their group stops protecting
  what it has not read anyway;
- refreshes the pending-entries gauge of every group.

The dead-letter stream is cut by length only: operators read it, no group does.
Several replicas may run housekeeping at once: every step is idempotent and
each lost entry is counted by exactly one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from esper.core.logs import get_logger
from esper.oona import envelope
from esper.oona.link import Link
from esper.oona.scripts import COUNT_GAPS, TRIM

_log = get_logger("esper.oona.housekeeping")
#: Without a TTL, a group silent this long stops protecting what it has not read.
_DEFAULT_GROUP_IDLE_MS = 3_600_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class HousekeepingReport:
    trimmed: dict[str, int] = field(default_factory=dict)
    unread_lost: dict[tuple[str, str], int] = field(default_factory=dict)
    consumers_removed: int = 0
    pending: dict[str, dict[str, int]] = field(default_factory=dict)


class Housekeeper:
    def __init__(self, link: Link) -> None:
        self.link = link
        redis = link.redis
        self._trim = redis.register_script(TRIM)
        self._gaps = redis.register_script(COUNT_GAPS)

    @property
    def group_idle_ms(self) -> int:
        """A group whose consumers have all been silent this long no longer pins what it has not read."""
        return self.link.config.message_ttl_ms or _DEFAULT_GROUP_IDLE_MS

    @property
    def consumer_expiry_ms(self) -> int:
        """A consumer silent this long, holding nothing, is removed from its group.

        Never sooner than :attr:`group_idle_ms`: a group left without consumers
        stops protecting its unread entries at once, so removing a consumer
        earlier would cut its group's protection short.
        """
        return max(self.group_idle_ms, 4 * self.link.config.delivery.claim_idle_ms)

    async def run_once(self) -> HousekeepingReport:
        c, keys, redis = self.link.config, self.link.keys, self.link.redis
        report = HousekeepingReport()
        idle_limit = self.group_idle_ms
        for stream in c.streams:
            key = keys.stream(stream)
            if stream == c.dead_letter_stream:
                removed = int(await redis.xtrim(key, maxlen=c.dead_letter_max_length, approximate=False))
            else:
                raw: Any = await self._trim(
                    keys=[key],
                    args=[envelope.now_ms(), c.message_ttl_ms or 0, c.max_stream_length or 0, idle_limit],
                )
                removed = int(raw[0])
                gaps: Any = await self._gaps(keys=[key, keys.gaps(stream)])
                for name, lost in zip(gaps[::2], gaps[1::2], strict=True):
                    group = _text(name)
                    report.unread_lost[(stream, group)] = int(lost)
                    self.link.metrics.on_trimmed_unread(stream, group, int(lost))
                    _log.warning("oona.trimmed_unread", stream=stream, group=group, entries=int(lost))
                report.consumers_removed += await self._remove_dead_consumers(key)
            report.trimmed[stream] = removed
            self.link.metrics.on_trimmed(stream, removed)
            report.pending[stream] = await self._pending(stream, key)
        return report

    async def _remove_dead_consumers(self, key: str) -> int:
        redis = self.link.redis
        removed = 0
        try:
            groups: Any = await redis.xinfo_groups(key)
        except ResponseError:
            return 0
        for info in groups:
            group = _text(info["name"])
            for consumer in await redis.xinfo_consumers(key, group):
                if int(consumer.get("pending") or 0) == 0 and int(consumer["idle"]) > self.consumer_expiry_ms:
                    await redis.xgroup_delconsumer(key, group, consumer["name"])
                    removed += 1
        return removed

    async def _pending(self, stream: str, key: str) -> dict[str, int]:
        try:
            groups: Any = await self.link.redis.xinfo_groups(key)
        except ResponseError:
            return {}
        out = {_text(info["name"]): int(info.get("pending") or 0) for info in groups}
        for group, depth in out.items():
            self.link.metrics.set_pending(stream, group, depth)
        return out
