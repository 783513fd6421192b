"""Consumers: the group reader that owns delivery, and the broadcast reader.

Use ``GroupConsumer`` (``client.consumer``) for work: each entry goes to one
replica of the group, is acked only after its handler succeeds, is retried
with backoff and an ``attempt`` count on failure, dead-lettered after
``retry_max_attempts``, and is claimed and processed by a live replica if its
consumer dies (XAUTOCLAIM after ``retry_idle_ms``).

Use ``BroadcastConsumer`` (``client.broadcast``) when every process must see
every entry, e.g. training processes each waiting for the
``KernelArtifactReady`` of their own request id. It reads with XREAD from
the last id it saw, runs the same verification (replay keys are per consumer
name), never acks and never dead-letters: the group consumers of the stream
own those duties.

Both run as an owned coroutine: ``await consumer.run()`` until cancelled or
until ``await consumer.stop()``, which lets the batch in flight finish and
be acked. Reads always use a finite BLOCK (never sleep-polling); Redis errors
go to the client's consume breaker and the loop reconnects with exponential
backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from esper.core.logs import get_logger
from esper.oona.envelope import Accepted, Rejection, verify_entry
from esper.oona.messages import Handler, OonaMessage, RejectMessage, RejectReason

if TYPE_CHECKING:
    from esper.oona.client import OonaClient

_log = get_logger("esper.oona.consumer")
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)
Entry = tuple[str, Mapping[bytes, bytes] | None]


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _decode_entries(raw: Any) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in raw or []:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        out.append((eid, fields))
    return out


class _Loop:
    """Shared run/stop/reconnect machinery."""

    def __init__(
        self,
        client: OonaClient,
        stream: str,
        handler: Handler,
        types: Collection[int],
        batch: int,
        block_ms: int | None,
        ignore_types: Collection[int] = (),
    ) -> None:
        config = client.config
        if block_ms is not None and block_ms > config.block_ms:
            raise ValueError("block_ms must not exceed StreamConfig.block_ms (socket timeout is set from it)")
        if not types:
            raise ValueError("declare the message types this consumer expects")
        self.client = client
        self.stream = stream
        self.handler = handler
        self.types = frozenset(int(t) for t in types)
        self.ignore_types = frozenset(int(t) for t in ignore_types) - self.types
        self.batch = max(1, batch)
        self.block_ms = block_ms or config.block_ms
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._backoff_s = config.reconnect_base_ms / 1000
        self.reconnects = 0
        #: Loop turns so far; a supervisor watchdog sees a stuck handler as no progress.
        self.iterations = 0
        self._read: asyncio.Future[Any] | None = None

    async def stop(self) -> None:
        """Ask ``run`` to finish: the current batch completes and is acked, then ``run`` returns.

        An idle blocking read is abandoned at once, so stopping never waits
        for the block time. (Should the server already have handed entries to
        that read, they stay pending for this consumer and are recovered like
        those of a crashed one: never lost.)
        """
        self._stop.set()
        if self._read is not None and not self._read.done():
            self._read.cancel()
        if self._running:
            await self._done.wait()

    async def _unless_stopped(self, waiting: Awaitable[Any]) -> bool:
        """Wait for ``waiting`` unless ``stop()`` comes first; True when it completed."""
        wait = asyncio.ensure_future(waiting)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({wait, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (wait, stop):
                if not task.done():
                    task.cancel()
            await asyncio.gather(wait, stop, return_exceptions=True)
        return wait.done() and not wait.cancelled() and not self._stop.is_set()

    async def _blocking_read(self, read: Callable[[], Awaitable[Any]]) -> Any:
        """Await a blocking XREAD/XREADGROUP that ``stop()`` may abandon (then: no entries)."""
        if self._stop.is_set():
            return None
        task = asyncio.ensure_future(read())
        self._read = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._stop.is_set() and not _being_cancelled():
                return None
            task.cancel()
            raise
        finally:
            self._read = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Consume until cancelled or stopped. Never raises for bad entries or Redis outages."""
        if self._running:
            raise RuntimeError("consumer is already running")
        self._running = True
        self._done.clear()
        breaker = self.client.consume_breaker
        try:
            await self._prepare()
            while not self._stop.is_set():
                self.iterations += 1
                if breaker.remaining_s() > 0 and not await self._unless_stopped(breaker.wait_ready()):
                    break
                try:
                    await self._iterate()
                except _TRANSIENT as exc:
                    await self._on_transient(exc)
                    continue
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._on_nogroup()
                    continue
                breaker.record_success()
                self._backoff_s = self.client.config.reconnect_base_ms / 1000
        finally:
            self._running = False
            self._done.set()

    async def _on_transient(self, exc: BaseException) -> None:
        self.client.consume_breaker.record_failure()
        self.reconnects += 1
        _log.warning(
            "oona.consume_redis_error",
            stream=self.stream,
            error=type(exc).__name__,
            retry_in_s=round(self._backoff_s, 3),
        )
        await self._unless_stopped(asyncio.sleep(self._backoff_s))
        self._backoff_s = min(self._backoff_s * 2, self.client.config.reconnect_max_ms / 1000)

    async def _prepare(self) -> None:
        """Hook run once before the loop (e.g. resolving a start id)."""

    async def _on_nogroup(self) -> None:
        """Hook for a missing group (e.g. after a server restart without persistence)."""

    async def _iterate(self) -> None:
        raise NotImplementedError

    def _verify(self, entry_id: str, fields: Mapping[bytes, bytes] | None) -> Accepted | Rejection:
        if fields is None:
            return Rejection(RejectReason.MALFORMED, "entry has no fields")
        c = self.client.config
        return verify_entry(
            self.client.keyring,
            self.stream,
            entry_id,
            fields,
            expected_types=self.types | self.ignore_types,
            freshness_window_ms=c.freshness_window_ms,
            max_payload_bytes=c.max_payload_bytes,
        )

    async def _check_replays(self, accepted: list[Accepted], scope: str) -> list[tuple[Accepted, bool]]:
        """One pipelined ``SET key ref NX GET PX 2*window`` per message, shared by all replicas.

        The stored value is the entry's own reference, so the same entry
        delivered again (claimed after a crash) is not mistaken for a replay;
        a different entry carrying a seen nonce is.
        """
        if not accepted:
            return []
        ttl = self.client.config.replay_ttl_ms
        redis = self.client.redis
        if len(accepted) == 1:  # the common low-latency case: skip pipeline overhead
            only = accepted[0]
            ref = f"{self.stream}/{only.message.entry_id}"
            previous = await redis.set(
                f"oona:replay:{scope}:{only.replay_key}", ref, nx=True, get=True, px=ttl
            )
            return [(only, previous is None or previous == ref.encode())]
        async with redis.pipeline(transaction=False) as pipe:
            for item in accepted:
                ref = f"{self.stream}/{item.message.entry_id}"
                pipe.set(f"oona:replay:{scope}:{item.replay_key}", ref, nx=True, get=True, px=ttl)
            results = await pipe.execute()
        out = []
        for item, previous in zip(accepted, results, strict=True):
            own = f"{self.stream}/{item.message.entry_id}".encode()
            out.append((item, previous is None or previous == own))
        return out


class GroupConsumer(_Loop):
    """Reads ``stream`` as one consumer of the client's group. See the module docstring."""

    def __init__(
        self,
        client: OonaClient,
        stream: str,
        handler: Handler,
        *,
        types: Collection[int],
        concurrency: int = 1,
        batch: int = 16,
        block_ms: int | None = None,
        ignore_types: Collection[int] = (),
        on_acked: Callable[[list[str]], None] | None = None,
    ) -> None:
        super().__init__(client, stream, handler, types, batch, block_ms, ignore_types)
        self.group = client.config.group
        self._on_acked = on_acked
        self.name = client.config.consumer
        self.concurrency = max(1, concurrency)
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
        raw: Any = await self._blocking_read(
            lambda: redis.xreadgroup(
                self.group, self.name, {self.stream: ">"}, count=self.batch, block=self.block_ms
            )
        )
        for _stream, entries in raw or []:
            await self._process(_decode_entries(entries))

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
            entries = [e for _s, batch in raw or [] for e in _decode_entries(batch)]
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
            entries = [e for e in _decode_entries(claimed) if e[1] is not None]
            if entries:
                _log.info("oona.claimed", stream=self.stream, count=len(entries))
                await self._process(entries)
            if cursor in (b"0-0", "0-0") or self._stop.is_set():
                return

    async def _process(self, entries: list[Entry]) -> None:
        client = self.client
        accepted: list[Accepted] = []
        ignored: list[str] = []
        rejected: list[tuple[str, Mapping[bytes, bytes], RejectReason, str]] = []
        for entry_id, fields in entries:
            outcome = self._verify(entry_id, fields)
            if isinstance(outcome, Rejection):
                rejected.append((entry_id, fields or {}, outcome.reason, outcome.detail))
            elif outcome.message.message_type in self.ignore_types:
                ignored.append(entry_id)
            else:
                accepted.append(outcome)
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
        client = self.client
        started = time.perf_counter()
        try:
            await self.handler(message)
        except asyncio.CancelledError:
            raise
        except RejectMessage as rejection:
            await self._reject(message, fields or {}, rejection)
            return
        except Exception as exc:  # noqa: BLE001 - a handler bug is routed to retry, never stops the loop
            client.metrics.on_handler_failed(self.stream, time.perf_counter() - started)
            await self._after_failure(message, fields or {}, exc)
            return
        client.metrics.on_consumed(self.stream, time.perf_counter() - started)
        done.append(message.entry_id)

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
            client.consume_breaker.record_failure()
            _log.warning(
                "oona.reject_write_failed",
                stream=self.stream,
                entry_id=message.entry_id,
                error=type(redis_exc).__name__,
            )

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
            client.consume_breaker.record_failure()
            _log.warning(
                "oona.retry_write_failed",
                stream=self.stream,
                entry_id=message.entry_id,
                error=type(redis_exc).__name__,
            )


class BroadcastConsumer(_Loop):
    """Sees every entry of ``stream`` from ``start_id`` on. See the module docstring.

    ``start_id`` ``"$"`` is resolved to the stream's last id when ``run``
    starts; ``ready`` is set then, so await ``ready.wait()`` before
    publishing a request whose answer you must not miss.
    """

    def __init__(
        self,
        client: OonaClient,
        stream: str,
        handler: Handler,
        *,
        types: Collection[int],
        start_id: str = "$",
        batch: int = 64,
        block_ms: int | None = None,
        ignore_types: Collection[int] = (),
    ) -> None:
        super().__init__(client, stream, handler, types, batch, block_ms, ignore_types)
        self.last_id = start_id
        self.name = client.config.consumer
        self.ready = asyncio.Event()

    async def _prepare(self) -> None:
        while self.last_id == "$":
            try:
                info = await self.client.redis.xinfo_stream(self.stream)
                last: Any = info.get("last-generated-id") or b"0-0"
                self.last_id = last.decode() if isinstance(last, bytes) else str(last)
            except ResponseError:
                self.last_id = "0-0"  # stream does not exist yet: everything is new
            except _TRANSIENT as exc:
                await self._on_transient(exc)
        self.ready.set()

    async def _iterate(self) -> None:
        raw: Any = await self._blocking_read(
            lambda: self.client.redis.xread(
                {self.stream: self.last_id}, count=self.batch, block=self.block_ms
            )
        )
        for _stream, entries in raw or []:
            await self._process(_decode_entries(entries))

    async def _process(self, entries: list[Entry]) -> None:
        metrics = self.client.metrics
        accepted: list[Accepted] = []
        for entry_id, fields in entries:
            outcome = self._verify(entry_id, fields)
            if isinstance(outcome, Rejection):
                metrics.on_rejected(self.stream, outcome.reason.value)
                _log.warning(
                    "oona.broadcast_rejected",
                    stream=self.stream,
                    entry_id=entry_id,
                    reason=outcome.reason.value,
                    detail=outcome.detail,
                )
            elif outcome.message.message_type in self.ignore_types:
                metrics.on_ignored(self.stream, 1)
            else:
                accepted.append(outcome)
        for item, fresh in await self._check_replays(accepted, f"bcast:{self.name}"):
            message = item.message
            if not fresh:
                metrics.on_rejected(self.stream, RejectReason.REPLAY.value)
                continue
            started = time.perf_counter()
            try:
                await self.handler(message)
            except asyncio.CancelledError:
                raise
            except RejectMessage as rejection:
                metrics.on_rejected(self.stream, rejection.reason)
                _log.warning(
                    "oona.broadcast_handler_rejected",
                    stream=self.stream,
                    entry_id=message.entry_id,
                    reason=rejection.reason,
                    detail=rejection.detail[:200],
                )
                continue
            except Exception as exc:  # noqa: BLE001 - counted and logged; no group holds it to retry
                metrics.on_handler_failed(self.stream, time.perf_counter() - started)
                metrics.on_rejected(self.stream, RejectReason.HANDLER_FAILED.value)
                _log.warning(
                    "oona.broadcast_handler_failed",
                    stream=self.stream,
                    entry_id=message.entry_id,
                    error=type(exc).__name__,
                )
                continue
            metrics.on_consumed(self.stream, time.perf_counter() - started)
        if entries:
            self.last_id = entries[-1][0]
