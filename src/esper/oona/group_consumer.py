"""``GroupConsumer``: the consumer-group reader that owns delivery.

Each entry goes to one replica of the group, is acked only after its handler
succeeds, is retried with backoff and an ``attempt`` count on failure,
dead-lettered after ``retry_max_attempts``, and is claimed and processed by a
live replica if its consumer dies (XAUTOCLAIM after ``retry_idle_ms``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Unpack

from redis.exceptions import RedisError

from esper.core.logs import get_logger
from esper.oona.consumer_loop import ConsumerLoop, Entry, ReadOptions, decode_entries
from esper.oona.messages import Handler, OonaMessage, RejectMessage, RejectReason

if TYPE_CHECKING:
    from esper.oona.client import OonaClient

_log = get_logger("esper.oona.consumer")


class GroupOptions(ReadOptions, total=False):
    """``ReadOptions`` plus the group reader's own (``batch`` defaults to 16)."""

    #: Handlers of one batch running at once.
    concurrency: int
    #: Called with the entry ids of each XACK, after it.
    on_acked: Callable[[list[str]], None] | None


_OPTION_NAMES = GroupOptions.__required_keys__ | GroupOptions.__optional_keys__


class GroupConsumer(ConsumerLoop):
    """Reads ``stream`` as one consumer of the client's group. See the module docstring."""

    DEFAULT_BATCH = 16

    def __init__(
        self, client: OonaClient, stream: str, handler: Handler, **options: Unpack[GroupOptions]
    ) -> None:
        super().__init__(client, stream, handler, options, _OPTION_NAMES)
        self.group = client.config.group
        self._on_acked = options.get("on_acked")
        self.name = client.config.consumer
        self.concurrency = max(1, options.get("concurrency", 1))
        self._claim_interval_s = max(0.05, client.config.retry_idle_ms / 2000)
        self._next_claim = 0.0
        self._recover_own = True

    async def _on_nogroup(self) -> None:
        await self.client.ensure_group(self.stream, self.group)

    async def _on_transient(self, exc: BaseException) -> None:
        # Whatever this consumer read before the outage may still be pending
        # under its name: take it up again first instead of waiting for a claim.
        self._recover_own = True
        await super()._on_transient(exc)

    async def _iterate(self) -> None:
        redis = self.client.redis
        if self._recover_own:
            await self._recover_own_pending()
        if time.monotonic() >= self._next_claim:
            await self._claim_stale()
            self._next_claim = time.monotonic() + self._claim_interval_s
        await self._read_and_process(
            lambda: redis.xreadgroup(
                self.group, self.name, {self.stream: ">"}, count=self.batch, block=self.block_ms
            )
        )

    async def _recover_own_pending(self) -> None:
        """Process entries already delivered to this consumer name but never acked.

        Runs at start and after a reconnect, so a restart of the process (same
        consumer name) or of the server resumes at once rather than after
        ``retry_idle_ms``.
        """
        start = "0"
        while not self._stop.is_set():
            raw: Any = await self.client.redis.xreadgroup(
                self.group, self.name, {self.stream: start}, count=self.batch
            )
            entries = [e for _s, batch in raw or [] for e in decode_entries(batch)]
            if not entries:
                break
            start = entries[-1][0]
            live = [e for e in entries if e[1] is not None]
            if live:
                _log.info("oona.recovered_pending", stream=self.stream, count=len(live))
                await self._process(live)
        self._recover_own = False

    async def _claim_stale(self) -> None:
        """XAUTOCLAIM entries idle past ``retry_idle_ms`` and process them like new ones."""
        c = self.client.config
        cursor: Any = "0-0"
        while True:
            reply = await self.client.redis.xautoclaim(
                self.stream,
                self.group,
                self.name,
                min_idle_time=c.retry_idle_ms,
                start_id=cursor,
                count=c.retry_batch_size,
            )
            cursor, claimed = reply[0], reply[1]
            entries = [e for e in decode_entries(claimed) if e[1] is not None]
            if entries:
                _log.info("oona.claimed", stream=self.stream, count=len(entries))
                await self._process(entries)
            if cursor in (b"0-0", "0-0") or self._stop.is_set():
                return

    async def _process(self, entries: list[Entry]) -> None:
        client = self.client
        accepted, ignored, rejections = self._sort(entries)
        rejected: list[tuple[str, Mapping[bytes, bytes], RejectReason, str]] = [
            (eid, fields or {}, why.reason, why.detail) for (eid, fields), why in rejections
        ]
        runnable: list[OonaMessage] = []
        for item, fresh in await self._check_replays(accepted, self.group):
            if fresh:
                runnable.append(item.message)
            else:
                entry = next(e for e in entries if e[0] == item.message.entry_id)
                rejected.append((entry[0], entry[1] or {}, RejectReason.REPLAY, "nonce already seen"))
        for _eid, _f, reason, _d in rejected:
            client.metrics.on_rejected(self.stream, reason.value)
        await client.dead_letter(self.stream, self.group, rejected)
        fields_by_id = {eid: f for eid, f in entries}
        if ignored:
            client.metrics.on_ignored(self.stream, len(ignored))
        done: list[str] = ignored
        try:
            if self.concurrency == 1 or len(runnable) == 1:
                for message in runnable:
                    await self._handle(message, fields_by_id[message.entry_id], done)
            else:
                limit = asyncio.Semaphore(self.concurrency)

                async def bounded(message: OonaMessage) -> None:
                    async with limit:
                        await self._handle(message, fields_by_id[message.entry_id], done)

                async with asyncio.TaskGroup() as group:
                    for message in runnable:
                        group.create_task(bounded(message))
        except asyncio.CancelledError:
            # Cancelled mid-batch: ack what already succeeded so it is not handled twice.
            if done:
                ack = asyncio.ensure_future(client.redis.xack(self.stream, self.group, *done))
                try:
                    await asyncio.shield(ack)
                except asyncio.CancelledError:
                    await ack
                    raise
            raise
        if done:
            await client.redis.xack(self.stream, self.group, *done)
            if self._on_acked is not None:
                self._on_acked(done)

    async def _handle(
        self, message: OonaMessage, fields: Mapping[bytes, bytes] | None, done: list[str]
    ) -> None:
        """Run the handler; success queues the ack, failure retries or dead-letters.

        A Redis error while retrying leaves the entry pending: it is claimed
        again later, so nothing is lost.
        """
        outcome = await self._call_handler(message)
        if outcome is None:
            done.append(message.entry_id)
        elif isinstance(outcome, RejectMessage):
            await self._reject(message, fields or {}, outcome)
        else:
            await self._after_failure(message, fields or {}, outcome)

    async def _reject(
        self, message: OonaMessage, fields: Mapping[bytes, bytes], rejection: RejectMessage
    ) -> None:
        """The handler refused the message: dead-letter it now with its reason, no retry.

        A Redis error leaves the entry pending; it is claimed and handled again later.
        """
        client = self.client
        client.metrics.on_rejected(self.stream, rejection.reason)
        try:
            await client.dead_letter(
                self.stream, self.group, [(message.entry_id, fields, rejection.reason, rejection.detail)]
            )
        except (RedisError, OSError) as redis_exc:
            self._write_failed("oona.reject_write_failed", message, redis_exc)

    async def _after_failure(
        self, message: OonaMessage, fields: Mapping[bytes, bytes], exc: Exception
    ) -> None:
        client = self.client
        c = client.config
        _log.warning(
            "oona.handler_failed",
            stream=self.stream,
            entry_id=message.entry_id,
            attempt=message.attempt,
            error=type(exc).__name__,
        )
        try:
            if message.attempt >= c.retry_max_attempts:
                client.metrics.on_rejected(self.stream, RejectReason.HANDLER_FAILED.value)
                detail = f"{type(exc).__name__} after {message.attempt} attempts"
                await client.dead_letter(
                    self.stream,
                    self.group,
                    [(message.entry_id, fields, RejectReason.HANDLER_FAILED, detail)],
                )
                return
            delay = min(c.retry_backoff_ms * 2 ** (message.attempt - 1), c.retry_backoff_max_ms) / 1000
            await asyncio.sleep(delay)
            await client.requeue(self.group, message)
        except (RedisError, OSError) as redis_exc:
            self._write_failed("oona.retry_write_failed", message, redis_exc)

    def _write_failed(self, event: str, message: OonaMessage, exc: BaseException) -> None:
        """A dead-letter or requeue write failed: count it against the consume breaker.

        The entry stays pending for this group, so it is claimed and handled
        again later; nothing is lost.
        """
        self.client.consume_breaker.record_failure()
        _log.warning(event, stream=self.stream, entry_id=message.entry_id, error=type(exc).__name__)
