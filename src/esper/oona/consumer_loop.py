"""The machinery both consumer kinds share: run/stop, reconnect, blocking reads, verification.

:class:`ConsumerLoop` owns everything that does not depend on *who* owns
delivery: the loop that turns until ``stop()``, the consume breaker and the
exponential reconnect backoff, the blocking read that ``stop()`` may abandon,
envelope verification with replay keys, and calling the handler with its
metrics. Subclasses (:mod:`esper.oona.group_consumer`,
:mod:`esper.oona.broadcast_consumer`) decide what to read and what to do
with each outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Required, TypedDict

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from esper.core.logs import get_logger
from esper.core.tasks import RunGuard
from esper.oona.envelope import Accepted, Rejection, verify_entry
from esper.oona.messages import Handler, OonaMessage, RejectMessage, RejectReason

if TYPE_CHECKING:
    from esper.oona.client import OonaClient

_log = get_logger("esper.oona.consumer")
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)
Entry = tuple[str, Mapping[bytes, bytes] | None]


class ReadOptions(TypedDict, total=False):
    """Options every consumer takes (declared once; see ``OonaClient.consumer``/``broadcast``)."""

    #: Message types handed to the handler; anything else is rejected as unexpected.
    types: Required[Collection[int]]
    #: Entries per read (the group and broadcast consumers have their own defaults).
    batch: int
    #: Block time of one read; at most ``StreamConfig.block_ms`` (the socket timeout is set from it).
    block_ms: int | None
    #: Other types that legitimately share the stream: verified, then counted as ignored.
    ignore_types: Collection[int]


def decode_entries(raw: Any) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in raw or []:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        out.append((eid, fields))
    return out


class ConsumerLoop:
    """Shared run/stop/reconnect machinery; ``options`` are checked against ``allowed``."""

    #: Entries per read unless ``batch`` is given (each consumer kind sets its own).
    DEFAULT_BATCH: ClassVar[int]

    def __init__(
        self,
        client: OonaClient,
        stream: str,
        handler: Handler,
        options: Mapping[str, Any],
        allowed: Collection[str],
    ) -> None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options: {', '.join(unknown)}")
        config = client.config
        block_ms: int | None = options.get("block_ms")
        if block_ms is not None and block_ms > config.block_ms:
            raise ValueError("block_ms must not exceed StreamConfig.block_ms (socket timeout is set from it)")
        types: Collection[int] = options.get("types", ())
        if not types:
            raise ValueError("declare the message types this consumer expects")
        self.client = client
        self.stream = stream
        self.handler = handler
        self.types = frozenset(int(t) for t in types)
        self.ignore_types = frozenset(int(t) for t in options.get("ignore_types", ())) - self.types
        self.batch = max(1, options.get("batch", self.DEFAULT_BATCH))
        self.block_ms = block_ms or config.block_ms
        # A stop() that comes before run() wins: the guard is not re-armed by run.
        self._guard = RunGuard("consumer")
        self._stop = self._guard.stop_event
        self._backoff_s = config.reconnect_base_ms / 1000
        self.reconnects = 0
        #: Loop turns so far; a supervisor watchdog sees a stuck handler as no progress.
        self.iterations = 0
        #: The task parked in a blocking read (only while it is parked there).
        self._reader: asyncio.Task[Any] | None = None
        self._abandoning = False

    async def stop(self) -> None:
        """Ask ``run`` to finish: the current batch completes and is acked, then ``run`` returns.

        An idle blocking read is abandoned at once, so stopping never waits
        for the block time. (Should the server already have handed entries to
        that read, they stay pending for this consumer and are recovered like
        those of a crashed one: never lost.)
        """
        self._stop.set()
        if self._reader is not None and not self._abandoning:
            self._abandoning = True
            self._reader.cancel()
        await self._guard.wait_stopped()

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
        """Await a blocking XREAD/XREADGROUP that ``stop()`` may abandon (then: no entries).

        The read runs in the consumer's own task (no extra task per read: this
        is the hot path); ``stop()`` cancels that task only while it is parked
        here, and the cancellation is taken back unless someone else also
        cancelled the task.
        """
        if self._stop.is_set():
            return None
        task = asyncio.current_task()
        self._reader = task
        try:
            return await read()
        except asyncio.CancelledError:
            if self._abandoning and task is not None and task.uncancel() == 0:
                return None
            raise
        finally:
            self._reader = None
            self._abandoning = False

    async def _read_and_process(self, read: Callable[[], Awaitable[Any]]) -> None:
        """One blocking read, its entries handed to ``_process`` stream by stream."""
        raw: Any = await self._blocking_read(read)
        for _stream, entries in raw or []:
            await self._process(decode_entries(entries))

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Consume until cancelled or stopped. Never raises for bad entries or Redis outages."""
        with self._guard.running_scope(rearm=False):
            breaker = self.client.consume_breaker
            await self._prepare()
            while not self._stop.is_set():
                self.iterations += 1
                if breaker.remaining_s() > 0 and not await self._unless_stopped(breaker.wait_ready()):
                    break
                try:
                    await self._iterate()
                except TRANSIENT as exc:
                    await self._on_transient(exc)
                    continue
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._on_nogroup()
                    continue
                breaker.record_success()
                self._backoff_s = self.client.config.reconnect_base_ms / 1000

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

    async def _process(self, entries: list[Entry]) -> None:
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

    def _sort(self, entries: list[Entry]) -> tuple[list[Accepted], list[str], list[tuple[Entry, Rejection]]]:
        """Verify each entry: (accepted for the handler, ignored entry ids, rejections)."""
        accepted: list[Accepted] = []
        ignored: list[str] = []
        rejected: list[tuple[Entry, Rejection]] = []
        for entry in entries:
            outcome = self._verify(*entry)
            if isinstance(outcome, Rejection):
                rejected.append((entry, outcome))
            elif outcome.message.message_type in self.ignore_types:
                ignored.append(entry[0])
            else:
                accepted.append(outcome)
        return accepted, ignored, rejected

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

    async def _call_handler(self, message: OonaMessage) -> Exception | None:
        """Run the handler and count it; the refusal or failure is returned, not raised.

        ``None`` means success (counted as consumed). A ``RejectMessage`` is
        the handler's deliberate refusal (counted by the caller with its
        reason); any other exception is a handler failure, counted here.
        Cancellation always propagates.
        """
        metrics = self.client.metrics
        started = time.perf_counter()
        try:
            await self.handler(message)
        except asyncio.CancelledError:
            raise
        except RejectMessage as rejection:
            return rejection
        except Exception as exc:  # noqa: BLE001 - a handler bug is the caller's to route, never stops the loop
            metrics.on_handler_failed(self.stream, time.perf_counter() - started)
            return exc
        metrics.on_consumed(self.stream, time.perf_counter() - started)
        return None
