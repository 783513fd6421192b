"""Trimming that never drops an entry some consumer group still owes an ack for.

For each stream the *floor* is the oldest id any group has not acknowledged:
its oldest pending entry, or the first entry after its last-delivered id.
TTL (MINID) and max-length cuts are both clamped to that floor, and trims are
exact so the reported counts are real. The dead-letter stream has no groups
to protect and is cut by length only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from esper.oona.envelope import now_ms

StreamId = tuple[int, int]

# Id of the oldest entry kept when keeping the newest ARGV[1] entries; avoids
# shipping up to max-length entries to the client just to find one id.
_NTH_NEWEST = """
local r = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
if #r < tonumber(ARGV[1]) then return false end
return r[#r][1]
"""


def parse_id(value: bytes | str) -> StreamId:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(value: StreamId) -> str:
    return f"{value[0]}-{value[1]}"


async def unacked_floor(redis: aioredis.Redis, stream: str) -> StreamId | None:
    """Oldest id not yet acknowledged by some group; None when no group exists."""
    try:
        groups: list[dict[Any, Any]] = await redis.xinfo_groups(stream)
    except ResponseError:
        return None
    floor: StreamId | None = None
    for info in groups:
        name: Any = info.get("name")
        last = parse_id(info.get("last-delivered-id") or b"0-0")
        candidate: StreamId = (last[0], last[1] + 1)
        if int(info.get("pending") or 0) > 0:
            summary = await redis.xpending(stream, name)
            if summary.get("min"):
                candidate = min(candidate, parse_id(summary["min"]))
        floor = candidate if floor is None else min(floor, candidate)
    return floor


async def trim_stream(
    redis: aioredis.Redis, stream: str, *, ttl_ms: int | None, max_length: int | None
) -> int:
    """Trim ``stream`` by age and length without passing its un-acked floor."""
    cut: StreamId | None = None
    if ttl_ms:
        cut = (max(0, now_ms() - ttl_ms), 0)
    if max_length:
        nth = await redis.eval(_NTH_NEWEST, 1, stream, str(max_length))
        if nth:
            length_cut = parse_id(nth)
            cut = length_cut if cut is None else max(cut, length_cut)
    if cut is None:
        return 0
    floor = await unacked_floor(redis, stream)
    if floor is not None:
        cut = min(cut, floor)
    trimmed: int = await redis.xtrim(stream, minid=format_id(cut), approximate=False)
    return trimmed


async def trim_streams(
    redis: aioredis.Redis,
    streams: Iterable[str],
    *,
    ttl_ms: int | None,
    max_length: int | None,
    dead_letter_stream: str,
    dead_letter_max_length: int,
) -> dict[str, int]:
    result: dict[str, int] = {}
    for stream in streams:
        if stream == dead_letter_stream:
            result[stream] = int(await redis.xtrim(stream, maxlen=dead_letter_max_length, approximate=False))
        else:
            result[stream] = await trim_stream(redis, stream, ttl_ms=ttl_ms, max_length=max_length)
    return result
