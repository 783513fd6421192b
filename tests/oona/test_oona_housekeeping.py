"""Trimming never removes an entry a group has not acknowledged."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient

STREAM = "oona.normal"


async def test_max_length_trim_stops_at_unacked_entry(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(max_stream_length=2, message_ttl_ms=None, dead_letter_max_length=3)
    await client.ensure_consumer_groups()
    ids = [(await client.publish_command(pb.AdaptationCommand(command_id=f"{i}"))).entry_id for i in range(6)]
    delivered = await redis_client.xreadgroup("test", "c1", {STREAM: ">"}, count=6)
    assert len(delivered[0][1]) == 6
    # Ack everything except entry 1: it must survive although only 2 entries are allowed.
    await redis_client.xack(STREAM, "test", *[i for n, i in enumerate(ids) if n != 1])
    trimmed = await client.housekeeping()
    remaining = [eid.decode() for eid, _ in await redis_client.xrange(STREAM)]
    assert ids[1] in remaining
    assert remaining == ids[1:]
    assert trimmed[STREAM] == 1
    # Once acked, the length cap applies fully.
    await redis_client.xack(STREAM, "test", ids[1])
    trimmed = await client.housekeeping()
    assert trimmed[STREAM] == 3
    assert [eid.decode() for eid, _ in await redis_client.xrange(STREAM)] == ids[4:]


async def test_undelivered_entries_survive_ttl_trim(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(max_stream_length=None, message_ttl_ms=1)
    await client.ensure_consumer_groups()
    old = [await redis_client.xadd(STREAM, {b"payload": b"x"}, id=f"{1000 + i}-0") for i in range(3)]
    # A second group has consumed and acked everything; the test group has seen nothing.
    await redis_client.xgroup_create(STREAM, "other", id="0")
    await redis_client.xreadgroup("other", "o", {STREAM: ">"})
    await redis_client.xack(STREAM, "other", *old)
    trimmed = await client.housekeeping()
    assert trimmed[STREAM] == 0
    assert await redis_client.xlen(STREAM) == 3
    # When the test group has delivered and acked the first two, only those go.
    got = await redis_client.xreadgroup("test", "c1", {STREAM: ">"}, count=2)
    await redis_client.xack(STREAM, "test", *[eid for eid, _ in got[0][1]])
    assert (await client.housekeeping())[STREAM] == 2
    assert [eid for eid, _ in await redis_client.xrange(STREAM)] == old[2:]


async def test_dead_letter_trimmed_by_length_only(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(dead_letter_max_length=2)
    for i in range(5):
        await redis_client.xadd("oona.deadletter", {b"reason": b"unsigned", b"n": str(i).encode()})
    trimmed = await client.housekeeping()
    assert trimmed["oona.deadletter"] == 3
    assert set(trimmed) == set(client.config.streams)
