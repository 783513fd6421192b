"""What every reader and writer of one Oona client shares.

An :class:`OonaClient` owns one :class:`Link`; the subscriptions and
broadcast readers it creates get the same link, so they share its connection
pool, key ring, metrics and breakers, and report trouble to one
:class:`HealthBoard` that the client's ``problems()`` (and a service's
readiness check) reads. Keeping this in a plain object lets readers depend
on it instead of on the client, so there is no import cycle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from esper.core.breaker import CircuitBreaker
from esper.core.logs import get_logger
from esper.oona.config import StreamConfig
from esper.oona.envelope import Accepted, Rejection, now_ms, verify_entry
from esper.oona.keys import KeySpace
from esper.oona.messages import RejectReason
from esper.oona.metrics import OonaMetrics
from esper.security.signing import KeyRing

_log = get_logger("esper.oona")

#: Errors that mean "the server is unreachable, restarting or no longer the primary": wait, then go on.
TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    ConnectionError,
    TimeoutError,
    OSError,
)
#: Anything a Redis call may raise: the transient errors plus the server's refusals.
REDIS_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT, RedisError)


def honour_cancellation() -> None:
    """Raise ``CancelledError`` if this task was cancelled and the Redis client raised something else.

    redis-py turns a cancellation that arrives while it handles a dead
    connection into a ``ConnectionError``; a reader that waited that out like
    any outage could then never be cancelled. Call this first wherever a
    Redis failure is caught.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class HealthBoard:
    """Named, current problems of a client's paths; an entry disappears when its path recovers."""

    def __init__(self) -> None:
        self._problems: dict[str, tuple[str, float]] = {}
        self._changed = asyncio.Event()

    def report(self, key: str, problem: str) -> None:
        since = self._problems.get(key, (problem, time.monotonic()))[1]
        if self._problems.get(key, ("", 0.0))[0] != problem:
            self._changed.set()
        self._problems[key] = (problem, since)

    def clear(self, key: str) -> None:
        if self._problems.pop(key, None) is not None:
            self._changed.set()

    def problems(self) -> list[str]:
        return [text for text, _since in self._problems.values()]

    async def wait_until(self, condition: Callable[[list[str]], bool]) -> list[str]:
        """Wait (on changes, not by polling) until ``condition(problems)`` holds; the problems then."""
        while not condition(found := self.problems()):
            self._changed.clear()
            await self._changed.wait()
        return found


class SignatureHint:
    """One clear, rate-limited hint when entries keep failing their signature check.

    Many ``bad_signature`` rejections in a row almost always mean the
    publisher and this reader were configured with different secrets (e.g. a
    service restarted with a freshly generated one while old entries remain
    on the streams). Each rejection is still dead-lettered and counted; this
    only says, at most once per ``every_s``, what to check.
    """

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last: float | None = None
        self.unexplained = 0

    def bad_signature(self, stream: str) -> None:
        self.unexplained += 1
        now = self._clock()
        if self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        _log.warning(
            "oona.signed_with_another_secret",
            hint="entries are signed with another secret: does ESPER_LEYLINE_SECRET match the publisher's?",
            stream=stream,
            rejected_since_last_hint=self.unexplained,
        )
        self.unexplained = 0


@dataclass
class Link:
    redis: aioredis.Redis
    config: StreamConfig
    keyring: KeyRing
    metrics: OonaMetrics
    publish_breaker: CircuitBreaker
    consume_breaker: CircuitBreaker
    keys: KeySpace = field(default_factory=KeySpace)
    health: HealthBoard = field(default_factory=HealthBoard)
    signature_hint: SignatureHint = field(default_factory=SignatureHint)

    def verify(
        self,
        stream: str,
        entry_id: str,
        fields: Mapping[bytes, bytes],
        expected_types: frozenset[int],
        *,
        attempt: int = 1,
        group: str | None = None,
    ) -> Accepted | Rejection:
        """Every check of a consumed entry that needs no Redis, against this reader's clock now."""
        c = self.config
        outcome = verify_entry(
            self.keyring,
            stream,
            entry_id,
            fields,
            expected_types=expected_types,
            now=now_ms(),
            freshness_window_ms=c.freshness_window_ms,
            max_payload_bytes=c.max_payload_bytes,
            attempt=attempt,
            group=group,
        )
        if isinstance(outcome, Rejection):
            self.metrics.on_rejected(stream, outcome.reason.value)
            if outcome.reason is RejectReason.BAD_SIGNATURE:
                self.signature_hint.bad_signature(stream)
        return outcome
