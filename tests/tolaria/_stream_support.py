"""Reading what Tolaria put on a real stream, envelope by envelope."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from esper.leyline import leyline_pb2

_L = leyline_pb2


async def read_stream(redis_url: str, stream: str) -> list[tuple[int, bytes]]:
    """(message type, inner payload) of every entry of ``stream``."""
    raw = aioredis.Redis.from_url(redis_url)
    try:
        entries: Any = await raw.xrange(stream)
    finally:
        await raw.aclose()
    out = []
    for _id, fields in entries:
        envelope = _L.BusEnvelope()
        envelope.ParseFromString(fields[b"payload"])
        out.append((int(envelope.message_type), envelope.payload))
    return out
