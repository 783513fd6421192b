"""``Subscription``: one (stream, group, handler, policy), run as a worker.

The group exists only on the stream it reads; it is created positioned at the
start of the freshness window, so a new group is handed what may still be
fresh, not a stream's whole history. Each entry goes to one consumer of the
group and is handled under a deadline (:mod:`esper.oona.delivery`); what
the handler produced commits together with its acknowledgement
(:mod:`esper.oona.commit`). Concretely, one turn of the loop:

1. commits left over from a refused commit are retried first (with backoff;
   no new entries are read while any wait, so memory stays bounded and the
   problem is reported to the client's health board);
2. after a start or an outage, this consumer's own pending entries are taken
   up again at once; failed deliveries whose backoff has passed are
   delivered again; entries held longer than ``claim_idle_ms`` by a consumer
   that stopped answering are taken over (all three in
   :mod:`esper.oona.takeover`, which also keeps every entry this consumer
   holds from looking abandoned);
3. a blocking read of new entries, at most until the next retry is due.

Errors from Redis never end the worker: they are counted on the consume
breaker, reported and waited out with backoff; the worker stops only when
``ctx.stopping`` is set, after the batch in flight has committed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from esper.core.logs import get_logger
from esper.core.worker import WorkerContext, unwrap
from esper.oona import envelope
from esper.oona.blocking import BlockingRead
from esper.oona.commit import Ack, CommitItem, CommitTarget, Committer, DeadLetter, Done
from esper.oona.config import DeliveryPolicy
from esper.oona.deadline import HandlerDeadline
from esper.oona.delivery import Dispatcher, Retry, has_deferred
from esper.oona.envelope import Accepted
from esper.oona.link import REDIS_FAILURES, TRANSIENT, Link, honour_cancellation
from esper.oona.messages import Handler, RejectReason
from esper.oona.scripts import CREATE_GROUP
from esper.oona.takeover import Delivery, Takeover, text
from esper.oona.wire_guard import OversizedEntry

_log = get_logger("esper.oona.subscription")
#: Results of a serial batch are committed together unless the first has waited this long.
_COMMIT_LINGER_S = 0.005
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class Subscription:
    """Consume ``stream`` as a member of ``group``; run with ``await subscription.run(ctx)``.

    ``types`` go to the handler; ``ignore_types`` are other types that
    legitimately share the stream (verified, acknowledged, counted as
    ignored). ``on_committed`` is called with the entry ids of each commit.
    """

    def __init__(
        self,
        link: Link,
        stream: str,
        group: str,
        handler: Handler,
        *,
        types: Collection[int],
        ignore_types: Collection[int] = (),
        policy: DeliveryPolicy | None = None,
        on_committed: Callable[[list[str]], None] | None = None,
    ) -> None:
        if not types:
            raise ValueError("declare the message types this subscription handles")
        if not group:
            raise ValueError("a subscription needs a group")
        config = link.config
        self.link = link
        self.stream = stream
        self.group = group
        self.consumer = config.instance
        self.policy = policy or config.delivery
        self.dispatcher = Dispatcher(
            link,
            stream,
            group,
            handler,
            types=frozenset(int(t) for t in types),
            ignore_types=frozenset(int(t) for t in ignore_types),
            policy=self.policy,
        )
        self.committer = Committer(
            link.redis,
            link.keys,
            CommitTarget(
                stream=stream,
                group=group,
                consumer=self.consumer,
                dead_letter_stream=config.dead_letter_stream,
                replay_ttl_ms=config.replay_ttl_ms,
                cap=config.cap,
                dead_letter_cap=config.dead_letter_max_length,
            ),
        )
        self._on_committed = on_committed
        self._key = link.keys.stream(stream)
        self._create_group = link.redis.register_script(CREATE_GROUP)
        self._read_problem = f"read:{stream}/{group}"
        self._commit_problem = f"commit:{stream}/{group}"
        self.takeover = Takeover(link, self._key, group, self.consumer, self.policy)
        self._uncommitted: list[CommitItem] = []
        self._queue: list[CommitItem] = []
        self._committing = False
        self._recover = True
        self._group_gone = False
        self._backoff_s = config.reconnect_base_ms / 1000
        self._read = BlockingRead()
        self._deadline = HandlerDeadline(self.policy.handler_timeout_ms / 1000)

    @property
    def name(self) -> str:
        return f"{self.stream}/{self.group}"

    # -- running ---------------------------------------------------------------------------

    async def run(self, ctx: WorkerContext) -> None:
        """Consume until ``ctx.stopping``; started once the group exists and reading begins."""
        self._read = reader = BlockingRead()
        helpers: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as group:
                helpers.append(group.create_task(reader.abandon_when(ctx.stopping)))
                helpers.append(group.create_task(self.takeover.keep_alive(ctx)))
                try:
                    await self._serve(ctx)
                finally:
                    self._deadline.close()
                    for task in helpers:
                        task.cancel()
        except BaseExceptionGroup as failure:
            raise unwrap(failure) from None

    async def _serve(self, ctx: WorkerContext) -> None:
        while not ctx.stopping.is_set():
            try:
                await self.ensure_group()
                break
            except REDIS_FAILURES as exc:
                await self._outage(ctx, exc)
        else:
            return
        ctx.started()
        _log.info("oona.subscribed", stream=self.stream, group=self.group, consumer=self.consumer)
        while not ctx.stopping.is_set():
            try:
                await self._turn(ctx)
            except TRANSIENT as exc:
                await self._outage(ctx, exc)
            except OversizedEntry as exc:
                await self._refuse_unreadable(ctx, exc)
            except RedisError as exc:
                if _no_group(exc):
                    self._group_gone = True  # the stream or the group was deleted: the next turn creates it
                else:
                    await self._outage(ctx, exc)
            else:
                self._recovered()
            ctx.progress()
        if self._uncommitted:
            await self._retry_uncommitted()

    async def ensure_group(self) -> None:
        """Create the group at the start of the freshness window (an existing one is kept)."""
        start = f"{max(0, envelope.now_ms() - self.link.config.freshness_window_ms)}-0"
        created = await self._create_group(keys=[self._key], args=[self.group, start])
        if created:
            _log.info("oona.group_created", stream=self.stream, group=self.group, start=start)

    async def _refuse_unreadable(self, ctx: WorkerContext, exc: OversizedEntry) -> None:
        """Dead-letter an entry too large even to discard, unread; the rest of its reply is re-read."""
        self._recover = True  # the other entries of that reply are pending for this consumer
        if exc.entry_id is None or not _STREAM_ID.match(exc.entry_id):
            await self._outage(ctx, exc)
            return
        self.link.metrics.on_rejected(self.stream, RejectReason.OVERSIZED.value)
        detail = f"entry has {exc.elements} fields and values; not read"
        await self._commit([self.dispatcher.dead_letter(exc.entry_id, {}, RejectReason.OVERSIZED, detail)])

    def _recovered(self) -> None:
        breaker = self.link.consume_breaker
        breaker.record_success()
        self.link.health.clear(self._read_problem)
        self._backoff_s = self.link.config.reconnect_base_ms / 1000

    async def _outage(self, ctx: WorkerContext, exc: BaseException) -> None:
        """Count, report and wait out a Redis problem; the consumer itself stays alive."""
        honour_cancellation()
        self.link.consume_breaker.record_failure()
        self._recover = True
        text = f"{type(exc).__name__}: {exc}"[:200]
        self.link.health.report(self._read_problem, f"{self.name} cannot read: {text}")
        if isinstance(exc, TRANSIENT):
            _log.warning(
                "oona.consume_redis_error", subscription=self.name, error=text, retry_in_s=self._backoff_s
            )
        else:
            _log.error("oona.consume_unexpected_error", subscription=self.name, exc_info=exc)
        await ctx.wait_stopping(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, self.link.config.reconnect_max_ms / 1000)

    async def _turn(self, ctx: WorkerContext) -> None:
        if self._group_gone:  # deleted under a read or a commit: created again (its entries: recovered)
            await self.ensure_group()
            self._group_gone, self._recover = False, True
        if self._uncommitted and not await self._retry_uncommitted():
            await ctx.wait_stopping(self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, self.link.config.reconnect_max_ms / 1000)
            return
        takeover = self.takeover
        if self._recover:
            async for page in takeover.own_pending(ctx):
                await self.process(ctx, page)
            self._recover = False
        if takeover.retries:
            await self.process(ctx, await takeover.due_retries())
        await self.process(ctx, await takeover.stale())
        if len(takeover.retries) >= 4 * self.policy.batch:
            await ctx.wait_stopping(takeover.until_next_retry_s() or self.link.config.block_ms / 1000)
            return  # hold back new work until failing entries drain
        # Block no longer than until the next retry is due or the next look for abandoned entries.
        retry = takeover.until_next_retry_s()
        wait = takeover.until_next_claim_s() if retry is None else min(retry, takeover.until_next_claim_s())
        block_ms = max(1, min(self.link.config.block_ms, int(wait * 1000) + 1))
        redis = self.link.redis
        raw: Any = await self._read.read(
            lambda: redis.xreadgroup(
                self.group, self.consumer, {self._key: ">"}, count=self.policy.batch, block=block_ms
            )
        )
        deliveries = [(text(eid), fields, 1) for _s, entries in raw or [] for eid, fields in entries]
        if deliveries:
            ctx.progress()
            await self.process(ctx, deliveries)

    # -- processing ------------------------------------------------------------------------

    async def process(self, ctx: WorkerContext, deliveries: Sequence[Delivery]) -> None:
        """Screen, handle and commit one batch of deliveries."""
        if not deliveries:
            return
        self.takeover.hold([entry_id for entry_id, _f, _a in deliveries])
        items: list[CommitItem] = []
        runnable: list[tuple[Accepted, Mapping[bytes, bytes]]] = []
        alone: list[tuple[str, int]] = []
        dispatcher = self.dispatcher
        for entry_id, fields, attempt in deliveries:
            if fields is not None and has_deferred(fields):
                alone.append((entry_id, attempt))
                continue
            outcome = dispatcher.screen(entry_id, fields, attempt)
            if not isinstance(outcome, Accepted):
                items.append(outcome)
            elif dispatcher.seen_here(outcome):
                items.append(dispatcher.replayed(outcome, fields or {}))
            else:
                runnable.append((outcome, fields or {}))
        if self.policy.concurrency == 1 or len(runnable) <= 1:
            await self._handle_serially(ctx, runnable, items)
        else:
            await self._handle_concurrently(ctx, runnable, items)
        for entry_id, attempt in alone:
            await self._fetch_alone(ctx, entry_id, attempt)

    async def _handle_serially(
        self,
        ctx: WorkerContext,
        runnable: list[tuple[Accepted, Mapping[bytes, bytes]]],
        items: list[CommitItem],
    ) -> None:
        first_waiting: float | None = time.monotonic() if items else None
        for accepted, fields in runnable:
            outcome = await self._handle(accepted, fields, self._deadline)
            ctx.progress()
            if isinstance(outcome, Retry):
                continue
            items.append(outcome)
            if first_waiting is None:
                first_waiting = time.monotonic()
            elif time.monotonic() - first_waiting >= _COMMIT_LINGER_S:
                await self._commit(items)
                items, first_waiting = [], None
        await self._commit(items)

    async def _handle_concurrently(
        self,
        ctx: WorkerContext,
        runnable: list[tuple[Accepted, Mapping[bytes, bytes]]],
        items: list[CommitItem],
    ) -> None:
        limit = asyncio.Semaphore(self.policy.concurrency)
        self._queue.extend(items)

        async def one(accepted: Accepted, fields: Mapping[bytes, bytes]) -> None:
            deadline = HandlerDeadline(self._deadline.timeout_s)  # one per task
            try:
                async with limit:
                    outcome = await self._handle(accepted, fields, deadline)
            finally:
                deadline.close()
            ctx.progress()
            if not isinstance(outcome, Retry):
                self._queue.append(outcome)
            # One turn of the loop first: the other handlers of the batch that are ready to finish
            # then do, and their results share this commit instead of waiting for the next one.
            await asyncio.sleep(0)
            await self._flush_queue()

        async with asyncio.TaskGroup() as group:
            for r in runnable:
                group.create_task(one(*r))
        await self._flush_queue()

    async def _flush_queue(self) -> None:
        """Group commit: whoever finds no commit under way commits everything queued, until none is.

        So a slow handler never holds back the replies of fast ones, and under
        load many results share one round trip.
        """
        if self._committing:
            return
        self._committing = True
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._commit(batch)
        finally:
            self._committing = False

    async def _handle(
        self, accepted: Accepted, fields: Mapping[bytes, bytes], deadline: HandlerDeadline
    ) -> CommitItem | Retry:
        outcome = await self.dispatcher.handle(accepted, fields, deadline)
        if isinstance(outcome, Retry):
            self.takeover.retry_later(outcome.entry_id, outcome.due, outcome.attempt)
        return outcome

    async def _fetch_alone(self, ctx: WorkerContext, entry_id: str, attempt: int) -> None:
        """An entry that did not fit in a shared read: read it by itself, or refuse it as oversized."""
        rows: Any = await self.link.redis.xrange(self._key, entry_id, entry_id)
        if not rows:
            await self._commit([Ack(entry_id)])
            return
        fields = rows[0][1]
        if has_deferred(fields):
            self.link.metrics.on_rejected(self.stream, RejectReason.OVERSIZED.value)
            detail = f"entry larger than one read may hold ({self.link.config.max_read_bytes} bytes)"
            await self._commit(
                [self.dispatcher.dead_letter(entry_id, fields, RejectReason.OVERSIZED, detail)]
            )
            return
        await self.process(ctx, [(entry_id, fields, attempt)])

    # -- committing ------------------------------------------------------------------------

    async def _commit(self, items: list[CommitItem]) -> bool:
        if not items:
            return True
        try:
            statuses = await self.committer.commit(items)
        except REDIS_FAILURES as exc:
            honour_cancellation()
            if _no_group(exc):
                self._drop_orphans(items)
                return False
            self._uncommitted.extend(items)
            self._commit_failed(exc)
            return False
        self.link.health.clear(self._commit_problem)
        self.takeover.release([item.entry_id for item in items])
        self._account(items, statuses)
        return True

    def _drop_orphans(self, items: list[CommitItem]) -> None:
        """The group (or the stream) was deleted after these entries were read: drop them.

        No group holds them any more, so no commit can go through; the script wrote
        nothing. The group is created again at the start of the freshness window
        before the next read, so entries still in the stream come again.
        """
        self._group_gone = True
        self.takeover.release([item.entry_id for item in items])
        for _item in items:
            self.link.metrics.on_lost(self.stream)
        _log.warning("oona.group_gone", subscription=self.name, dropped=len(items))

    async def _retry_uncommitted(self) -> bool:
        items, self._uncommitted = self._uncommitted, []
        return await self._commit(items)

    def _commit_failed(self, exc: BaseException) -> None:
        metrics, stream = self.link.metrics, self.stream
        metrics.on_commit_failed(stream)
        text = f"{type(exc).__name__}: {exc}"[:200]
        self.link.health.report(self._commit_problem, f"{self.name} cannot commit: {text}")
        _log.warning("oona.commit_failed", subscription=self.name, entries=len(self._uncommitted), error=text)

    def _account(self, items: Sequence[CommitItem], statuses: Sequence[str]) -> None:
        metrics = self.link.metrics
        for item, status in zip(items, statuses, strict=True):
            if status == "lost":
                metrics.on_lost(self.stream)
            elif status == "replay":  # a copy committed first by another replica of the group
                if isinstance(item, Done) and item.replay_key is not None:
                    self.dispatcher.remember(item.replay_key)
                metrics.on_rejected(self.stream, RejectReason.REPLAY.value)
                metrics.on_dead_letter(RejectReason.REPLAY.value)
                _log.warning(
                    "oona.dead_letter", subscription=self.name, entry_id=item.entry_id, reason="replay"
                )
            elif status == "dead" and isinstance(item, DeadLetter):
                metrics.on_dead_letter(item.reason)
                _log.warning(
                    "oona.dead_letter",
                    subscription=self.name,
                    entry_id=item.entry_id,
                    reason=item.reason,
                    detail=item.fields.get(b"detail", b"").decode("utf-8", "replace"),
                )
            elif isinstance(item, Done):
                if item.replay_key is not None:
                    self.dispatcher.remember(item.replay_key)
                for reply in item.replies:
                    metrics.on_published(reply.stream)
        if self._on_committed is not None:
            self._on_committed([item.entry_id for item in items])


def _no_group(exc: BaseException) -> bool:
    """Whether Redis refused because the group (or its whole stream) no longer exists."""
    return "NOGROUP" in str(exc)
