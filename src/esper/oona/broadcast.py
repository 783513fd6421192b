"""``BroadcastReader``: a reader that sees every entry of a stream, for when every process must.

E.g. training processes each waiting for the ``KernelArtifactReady`` of their
own request id, or every Weatherlight replica applying each policy update.
It reads with XREAD from the last id it saw (no group, so it pins nothing and
acknowledges nothing), runs the same verification as a subscription, and
keeps its own replay guard in Redis (scoped to this reader's instance, so a
restart that resumes from an old id does not mistake entries it already saw
for replays). Refusals and handler failures are counted and logged; there is
no retry, because there is no group to hold the entry.

A reader that ignores some types on its stream (every Kasmina warmer reads
the catalog updates among all the ready replies) reads through a server-side
script that leaves those entries out, so its cost follows what it handles,
not the stream's traffic; it waits with a blocking XREAD only once the
script finds nothing new. Where scripts are not allowed (a trainer's ACL),
it reads everything and skips ignored types itself.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Collection
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

from esper.core.logs import get_logger
from esper.core.worker import WorkerContext, unwrap
from esper.oona.blocking import BlockingRead
from esper.oona.deadline import HandlerDeadline
from esper.oona.delivery import has_deferred
from esper.oona.envelope import PAYLOAD, Accepted, Rejection, peek_message_type
from esper.oona.link import REDIS_FAILURES, TRANSIENT, Link, honour_cancellation
from esper.oona.messages import Handler, RejectMessage, RejectReason
from esper.oona.scripts import SCAN_BROADCAST
from esper.oona.wire_guard import MAX_ITEMS, OversizedEntry

_log = get_logger("esper.oona.broadcast")


class BroadcastReader:
    """Sees every entry of ``stream`` after ``start_id`` (``"$"``: from when it starts)."""

    def __init__(
        self,
        link: Link,
        stream: str,
        handler: Handler,
        *,
        types: Collection[int],
        ignore_types: Collection[int] = (),
        start_id: str = "$",
        batch: int = 64,
        linger_ms: int = 0,
    ) -> None:
        if not types:
            raise ValueError("declare the message types this reader handles")
        if not 1 <= batch <= MAX_ITEMS:
            raise ValueError(f"batch must be between 1 and {MAX_ITEMS}")  # a longer reply reads as hostile
        self.link = link
        self.stream = stream
        self.handler = handler
        self.types = frozenset(int(t) for t in types)
        self.ignore_types = frozenset(int(t) for t in ignore_types) - self.types
        self._expected = self.types | self.ignore_types
        self.batch = batch
        #: The id after which the next read starts; a new reader given it resumes where this one was.
        self.last_id = start_id
        self._key = link.keys.stream(stream)
        self._scope = f"bcast:{link.config.instance}"
        self._backoff_s = link.config.reconnect_base_ms / 1000
        #: Once caught up, wait this long before reading again: bounds how often a reader that
        #: needs no low latency wakes on a busy stream (it then reads what gathered in one go).
        self._linger_s = max(0, linger_ms) / 1000
        self._scan = link.redis.register_script(SCAN_BROADCAST) if self.ignore_types else None
        self._ignored_args = sorted(self.ignore_types)
        self._deadline = HandlerDeadline(link.config.delivery.handler_timeout_ms / 1000)

    async def run(self, ctx: WorkerContext) -> None:
        """Read until ``ctx.stopping``; started once positioned (nothing published later is missed)."""
        reader = BlockingRead()
        try:
            async with asyncio.TaskGroup() as group:
                helper = group.create_task(reader.abandon_when(ctx.stopping))
                try:
                    await self._serve(ctx, reader)
                finally:
                    self._deadline.close()
                    helper.cancel()
        except BaseExceptionGroup as failure:
            raise unwrap(failure) from None

    async def _serve(self, ctx: WorkerContext, reader: BlockingRead) -> None:
        while self.last_id == "$" and not ctx.stopping.is_set():
            try:
                info: Any = await self.link.redis.xinfo_stream(self._key)
                self.last_id = _text(info.get("last-generated-id") or b"0-0")
            except ResponseError:
                self.last_id = "0-0"  # no stream yet: everything written from now on is new
            except TRANSIENT as exc:
                await self._outage(ctx, exc)
        if ctx.stopping.is_set():
            return
        ctx.started()
        c = self.link.config
        count = self.batch
        while not ctx.stopping.is_set():
            try:
                entries, last, caught_up = await self._next(reader, count)
                if entries:
                    await self._process(ctx, entries)
                if last is not None:
                    self.last_id = last
                count = self.batch
            except OversizedEntry as exc:
                # Too large even to discard: read one entry at a time up to it, then skip it.
                if count == 1 and exc.entry_id is not None:
                    self.link.metrics.on_rejected(self.stream, RejectReason.OVERSIZED.value)
                    _log.warning(
                        "oona.broadcast_rejected",
                        stream=self.stream,
                        entry_id=exc.entry_id,
                        reason="oversized",
                        detail=str(exc),
                    )
                    self.last_id, count = exc.entry_id, self.batch
                else:
                    count = 1
                continue
            except REDIS_FAILURES as exc:
                await self._outage(ctx, exc)
                continue
            self.link.health.clear(f"broadcast:{self.stream}")
            self._backoff_s = c.reconnect_base_ms / 1000
            ctx.progress()
            if caught_up and last is not None and self._linger_s:
                await ctx.wait_stopping(self._linger_s)

    async def _next(self, reader: BlockingRead, count: int) -> tuple[list[tuple[str, Any]], str | None, bool]:
        """Up to ``count`` entries to judge, the id to resume after (None: nothing new), caught up."""
        if self._scan is not None:
            try:
                scanned: Any = await self._scan(
                    keys=[self._key], args=[self.last_id, count, *self._ignored_args]
                )
            except NoPermissionError:
                self._scan = None
                _log.info("oona.broadcast_filters_locally", stream=self.stream, why="scripts not permitted")
            else:
                if scanned:
                    kept, skipped = scanned[1], int(scanned[2])
                    if skipped:
                        self.link.metrics.on_ignored(self.stream, skipped)
                    entries = [(_text(i), _pairs(f)) for i, f in kept]
                    return entries, _text(scanned[0]), len(kept) + skipped < count
        # Nothing new: block until there is (one entry, then scan the rest when the script is on).
        wait = count if self._scan is None else 1
        read = functools.partial(
            self.link.redis.xread, {self._key: self.last_id}, count=wait, block=self.link.config.block_ms
        )
        raw: Any = await reader.read(read)
        entries = [(_text(i), f) for _s, batch in raw or [] for i, f in batch]
        caught_up = self._scan is None and len(entries) < count  # else: scan what came after it
        return entries, entries[-1][0] if entries else None, caught_up

    async def _outage(self, ctx: WorkerContext, exc: BaseException) -> None:
        honour_cancellation()
        text = f"{type(exc).__name__}: {exc}"[:200]
        self.link.health.report(f"broadcast:{self.stream}", f"broadcast reader of {self.stream}: {text}")
        _log.warning("oona.broadcast_redis_error", stream=self.stream, error=text, retry_in_s=self._backoff_s)
        await ctx.wait_stopping(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, self.link.config.reconnect_max_ms / 1000)

    async def _process(self, ctx: WorkerContext, entries: list[tuple[str, Any]]) -> None:
        link, metrics = self.link, self.link.metrics
        accepted: list[Accepted] = []
        ignored = 0
        for entry_id, fields in entries:
            if fields is None:
                continue
            claimed = fields.get(PAYLOAD)
            if isinstance(claimed, bytes) and peek_message_type(claimed) in self.ignore_types:
                ignored += 1  # never acted on, so it needs no signature check
                continue
            if has_deferred(fields):
                rows: Any = await link.redis.xrange(self._key, entry_id, entry_id)
                fields = rows[0][1] if rows else None
                if fields is None or has_deferred(fields):
                    metrics.on_rejected(self.stream, RejectReason.OVERSIZED.value)
                    continue
            outcome = link.verify(self.stream, entry_id, fields, self._expected)
            if isinstance(outcome, Rejection):
                _log.warning(
                    "oona.broadcast_rejected",
                    stream=self.stream,
                    entry_id=entry_id,
                    reason=outcome.reason.value,
                    detail=outcome.detail,
                )
            elif outcome.target_group is not None:
                continue  # a dead letter handed back to one group only
            elif outcome.message.message_type in self.ignore_types:
                ignored += 1
            else:
                accepted.append(outcome)
        if ignored:
            metrics.on_ignored(self.stream, ignored)
        for item, fresh in zip(accepted, await self._claim(accepted), strict=True):
            if not fresh:
                metrics.on_rejected(self.stream, RejectReason.REPLAY.value)
                continue
            await self._handle(item)
            ctx.progress()

    async def _claim(self, accepted: list[Accepted]) -> list[bool]:
        """One pipelined ``SET key ref NX GET PX ttl`` per message; True where it is not a replay."""
        if not accepted:
            return []
        keys, ttl = self.link.keys, self.link.config.replay_ttl_ms
        async with self.link.redis.pipeline(transaction=False) as pipe:
            for item in accepted:
                ref = f"{self.stream}/{item.message.entry_id}"
                pipe.set(keys.replay(self._scope, item.replay_key), ref, nx=True, get=True, px=ttl)
            previous = await pipe.execute()
        return [
            seen is None or seen == f"{self.stream}/{item.message.entry_id}".encode()
            for item, seen in zip(accepted, previous, strict=True)
        ]

    async def _handle(self, item: Accepted) -> None:
        message, metrics = item.message, self.link.metrics
        started = time.perf_counter()
        try:
            async with self._deadline:
                produced = await self.handler(message)
        except RejectMessage as refusal:
            metrics.on_rejected(self.stream, refusal.reason)
            _log.warning(
                "oona.broadcast_handler_rejected",
                stream=self.stream,
                entry_id=message.entry_id,
                reason=refusal.reason,
                detail=refusal.detail[:200],
            )
            return
        except Exception as exc:  # noqa: BLE001 - a handler bug is counted and logged, the reader goes on
            metrics.on_handler_failed(self.stream, time.perf_counter() - started)
            metrics.on_rejected(self.stream, RejectReason.HANDLER_FAILED.value)
            _log.warning(
                "oona.broadcast_handler_failed", stream=self.stream, entry_id=message.entry_id, exc_info=exc
            )
            return
        metrics.on_consumed(self.stream, time.perf_counter() - started)
        if produced:
            _log.error("oona.broadcast_handler_replied", stream=self.stream, dropped=len(produced))


def _pairs(flat: Any) -> dict[bytes, Any] | None:
    """A script's flat ``[field, value, ...]`` as the mapping XREAD gives (None: a deleted entry)."""
    return None if flat is None else dict(zip(flat[::2], flat[1::2], strict=False))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
