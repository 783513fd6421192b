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
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from esper.core.breaker import CircuitBreaker
from esper.oona.config import StreamConfig
from esper.oona.keys import KeySpace
from esper.oona.metrics import OonaMetrics
from esper.security.signing import KeyRing

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
