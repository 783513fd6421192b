"""Shared Oona test helpers (imported by the tests; fixtures live in conftest)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from esper.leyline import leyline_pb2 as pb
from esper.oona import DeliveryPolicy, OonaMessage, Reply, StreamConfig
from esper.security.signing import KeyRing

SECRET = b"oona-test-secret-0123456789abcdef"
CMD = pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
STATE = pb.BUS_MESSAGE_TYPE_SYSTEM_STATE
REPORT = pb.BUS_MESSAGE_TYPE_FIELD_REPORT
NORMAL = "oona.normal"
DLQ = "oona.deadletter"
#: Short timings so retries, deadlines and claims happen within a test.
QUICK = DeliveryPolicy(
    batch=8,
    handler_timeout_ms=2_000,
    max_deliveries=3,
    retry_backoff_ms=10,
    retry_backoff_max_ms=40,
    claim_idle_ms=60_000,
)


def make_config(**overrides: Any) -> StreamConfig:
    base = StreamConfig(instance="test-0", block_ms=200, delivery=QUICK, reconnect_max_ms=200)
    return replace(base, **overrides)


def policy(**overrides: Any) -> DeliveryPolicy:
    return replace(QUICK, **overrides)


def command(command_id: str) -> pb.AdaptationCommand:
    return pb.AdaptationCommand(command_id=command_id)


def command_id(message: OonaMessage) -> str:
    return message.decode(pb.AdaptationCommand).command_id


def envelope_bytes(
    *,
    message_type: int = CMD,
    body: bytes | None = None,
    issued_at_ms: int | None = None,
    nonce: str | None = None,
    **extra: str,
) -> bytes:
    """A BusEnvelope as this platform signs it (attributes chosen by the test)."""
    env = pb.BusEnvelope(
        message_type=message_type, payload=body if body is not None else command("x").SerializeToString()
    )
    env.attributes["issued_at_ms"] = str(issued_at_ms if issued_at_ms is not None else now_ms())
    env.attributes["nonce"] = nonce or uuid.uuid4().hex
    env.attributes.update(extra)
    return env.SerializeToString(deterministic=True)


def signed(ring: KeyRing, payload: bytes, *, kid: bool = True) -> dict[bytes, bytes]:
    fields = {b"payload": payload, b"signature": ring.sign(payload).encode()}
    if kid:
        fields[b"kid"] = ring.kid.encode()
    return fields


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Recorder:
    """A handler that records messages and signals when ``expected`` have arrived."""

    def __init__(self, expected: int = 1, replies: tuple[Reply, ...] = ()) -> None:
        self.messages: list[OonaMessage] = []
        self.expected = expected
        self.replies = replies
        self.done = asyncio.Event()

    async def __call__(self, message: OonaMessage) -> tuple[Reply, ...]:
        self.messages.append(message)
        if len(self.messages) >= self.expected:
            self.done.set()
        return self.replies

    async def wait(self, limit_s: float = 10.0) -> None:
        await asyncio.wait_for(self.done.wait(), limit_s)

    def expect(self, total: int) -> None:
        """Wait for ``total`` messages in all from now on."""
        self.expected = total
        self.done = asyncio.Event()
        if len(self.messages) >= total:
            self.done.set()

    @property
    def ids(self) -> list[str]:
        return [command_id(m) for m in self.messages]


async def read_stream(
    redis: aioredis.Redis, key: str, count: int, *, after: str = "0-0", limit_s: float = 10.0
) -> list[tuple[str, dict[bytes, bytes]]]:
    """Wait (blocking XREAD, no polling) until ``count`` entries exist after ``after``; return them."""
    seen: list[tuple[str, dict[bytes, bytes]]] = []
    last = after

    async def collect() -> None:
        nonlocal last
        while len(seen) < count:
            reply = await redis.xread({key: last}, block=1000)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    seen.append((last, fields))

    await asyncio.wait_for(collect(), limit_s)
    return seen


async def dead_letters(
    redis: aioredis.Redis, count: int, *, key: str = DLQ, limit_s: float = 10.0
) -> list[dict[bytes, bytes]]:
    """Wait until ``count`` dead letters exist; their fields."""
    return [fields for _id, fields in await read_stream(redis, key, count, limit_s=limit_s)]


async def pending(redis: aioredis.Redis, stream: str, group: str) -> int:
    return int((await redis.xpending(stream, group))["pending"])


def reasons(letters: list[Mapping[bytes, bytes]]) -> list[str]:
    return sorted(letter[b"reason"].decode() for letter in letters)
