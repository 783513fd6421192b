"""Shared Oona test helpers (imported by the tests; fixtures live in conftest)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from esper.oona import OonaMessage, StreamConfig

SECRET = b"oona-test-secret-0123456789abcdef"


def make_config(**overrides: Any) -> StreamConfig:
    base = StreamConfig(group="test", consumer="c1", block_ms=200, retry_backoff_ms=5, retry_idle_ms=60_000)
    return replace(base, **overrides)


class Recorder:
    """A handler that records messages and signals when ``expected`` have arrived."""

    def __init__(self, expected: int = 1) -> None:
        self.messages: list[OonaMessage] = []
        self.expected = expected
        self.done = asyncio.Event()

    async def __call__(self, message: OonaMessage) -> None:
        self.messages.append(message)
        if len(self.messages) >= self.expected:
            self.done.set()

    async def wait(self, limit_s: float = 10.0) -> None:
        await asyncio.wait_for(self.done.wait(), limit_s)


async def dead_letters(redis: aioredis.Redis, count: int, limit_s: float = 10.0) -> list[dict[bytes, bytes]]:
    """Wait (blocking XREAD, no polling) until ``count`` dead letters exist; return their fields."""
    seen: list[dict[bytes, bytes]] = []
    last = "0-0"

    async def collect() -> None:
        nonlocal last
        while len(seen) < count:
            reply = await redis.xread({"oona.deadletter": last}, block=1000)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    seen.append(fields)

    await asyncio.wait_for(collect(), limit_s)
    return seen


@contextlib.asynccontextmanager
async def running(*consumers: Any) -> AsyncIterator[None]:
    """Run consumers as owned tasks; stop them gracefully (drain + ack) on exit."""
    async with asyncio.TaskGroup() as group:
        for consumer in consumers:
            group.create_task(consumer.run())
        try:
            yield
        finally:
            for consumer in consumers:
                await consumer.stop()
