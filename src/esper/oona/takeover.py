"""Entries a consumer must handle besides new ones, and keeping its own from looking abandoned.

A subscription gets work from four places; three of them are here:

- its *own* pending entries (a previous run under the same consumer name, or
  reads lost in an outage), taken up at once after a start or an outage:
  stable consumer names make a restarted replica resume its own work
  without waiting for a claim;
- failed deliveries whose backoff has passed (retries stay inside the group:
  the server's delivery count is the attempt);
- entries held longer than ``claim_idle_ms`` by a consumer that stopped
  answering, taken over one page at a time.

Every entry this consumer holds and has not committed yet (handler running,
waiting its turn in a batch, or waiting for a refused commit to go through)
is kept fresh by :meth:`Takeover.keep_alive`, so no other consumer takes it
over while this one is alive. Entries waiting for a retry are not: their
retry claims them back only when they have been idle since the failure.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from esper.core.logs import get_logger
from esper.core.worker import WorkerContext
from esper.oona.config import DeliveryPolicy
from esper.oona.link import REDIS_FAILURES, Link, honour_cancellation

_log = get_logger("esper.oona.takeover")
#: (entry id, fields or None when deleted, attempt = the server's delivery count).
Delivery = tuple[str, Mapping[bytes, bytes] | None, int]


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Takeover:
    """Own pending entries, due retries, stale entries of silent consumers, keep-alive."""

    def __init__(self, link: Link, key: str, group: str, consumer: str, policy: DeliveryPolicy) -> None:
        self.link = link
        self.key = key
        self.group = group
        self.consumer = consumer
        self.policy = policy
        #: Failed deliveries: entry id -> (when to deliver again, monotonic; attempt that failed).
        self.retries: dict[str, tuple[float, int]] = {}
        #: Entries held and not yet committed: entry id -> when their idle time was last reset.
        self.held: dict[str, float] = {}
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._name = f"{link.keys.logical(key)}/{group}"

    def hold(self, entry_ids: list[str]) -> None:
        now = time.monotonic()
        for entry_id in entry_ids:
            self.held.setdefault(entry_id, now)

    def release(self, entry_ids: list[str]) -> None:
        for entry_id in entry_ids:
            self.held.pop(entry_id, None)

    def retry_later(self, entry_id: str, due: float, attempt: int) -> None:
        self.held.pop(entry_id, None)
        self.retries[entry_id] = (due, attempt)

    def until_next_retry_s(self) -> float | None:
        if not self.retries:
            return None
        return max(0.0, min(due for due, _ in self.retries.values()) - time.monotonic())

    def until_next_claim_s(self) -> float:
        """How long until :meth:`stale` looks again, so a blocking read does not outlast it."""
        return max(0.0, self._next_claim - time.monotonic())

    async def own_pending(self, ctx: WorkerContext) -> AsyncIterator[list[Delivery]]:
        """Pages of entries pending for this consumer name, claimed back for this run."""
        redis = self.link.redis
        start = "-"
        while not ctx.stopping.is_set():
            rows: Any = await redis.xpending_range(
                self.key, self.group, start, "+", self.policy.claim_batch, consumername=self.consumer
            )
            if not rows:
                return
            start = "(" + text(rows[-1]["message_id"])
            counts = {
                text(r["message_id"]): int(r["times_delivered"])
                for r in rows
                if text(r["message_id"]) not in self.retries
            }
            if not counts:
                continue
            idle = min(int(r["time_since_delivered"]) for r in rows)
            claimed: Any = await redis.xclaim(self.key, self.group, self.consumer, idle, [*counts])
            _log.info("oona.resumed_own_pending", subscription=self._name, count=len(claimed))
            yield [(text(i), f, counts.get(text(i), 1) + 1) for i, f in claimed]

    async def due_retries(self) -> list[Delivery]:
        now = time.monotonic()
        due = {eid: attempt for eid, (at, attempt) in self.retries.items() if at <= now}
        if not due:
            return []
        for eid in due:
            del self.retries[eid]
        # Only entries still ours and idle at least since the failure: never take one back
        # from a consumer that took it over meanwhile.
        claimed: Any = await self.link.redis.xclaim(
            self.key, self.group, self.consumer, self.policy.retry_backoff_ms, [*due]
        )
        return [(text(i), f, due[text(i)] + 1) for i, f in claimed]

    async def stale(self) -> list[Delivery]:
        """One page of entries whose consumer has been silent for ``claim_idle_ms`` (when due)."""
        now = time.monotonic()
        if now < self._next_claim:
            return []
        # Looking five times per claim period bounds the take-over at 1.2 x claim_idle_ms.
        self._next_claim = now + self.policy.claim_idle_ms / 5000
        redis = self.link.redis
        reply: Any = await redis.xautoclaim(
            self.key,
            self.group,
            self.consumer,
            self.policy.claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.policy.claim_batch,
        )
        self._claim_cursor = text(reply[0])
        claimed = [(text(i), f) for i, f in reply[1] if i is not None]
        if not claimed:
            return []
        rows: Any = await redis.xpending_range(
            self.key, self.group, claimed[0][0], claimed[-1][0], len(claimed), consumername=self.consumer
        )
        counts = {text(r["message_id"]): int(r["times_delivered"]) for r in rows}
        self.link.metrics.on_claimed(self.link.keys.logical(self.key), len(claimed))
        _log.info("oona.claimed", subscription=self._name, count=len(claimed))
        return [(i, f, counts.get(i, 2)) for i, f in claimed]

    async def keep_alive(self, ctx: WorkerContext) -> None:
        """Owned helper task: reset the idle time of held entries every third of ``claim_idle_ms``."""
        period = self.policy.claim_idle_ms / 3000
        while not await ctx.wait_stopping(period):
            now = time.monotonic()
            old: list[Any] = [eid for eid, since in self.held.items() if now - since >= period]
            if not old:
                continue
            try:
                await self.link.redis.xclaim(self.key, self.group, self.consumer, 0, [*old], justid=True)
            except REDIS_FAILURES as exc:
                honour_cancellation()
                _log.warning("oona.keep_alive_failed", subscription=self._name, error=type(exc).__name__)
                continue
            for eid in old:
                if eid in self.held:
                    self.held[eid] = now
