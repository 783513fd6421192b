"""The bounded reply parser: large values become digests, a reply's budget defers, huge arrays go."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from esper.oona.wire_guard import OmittedValue, OversizedEntry, bounded_parser


@pytest.fixture
async def guarded(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    pool = aioredis.ConnectionPool.from_url(
        redis_url, protocol=2, max_connections=1, parser_class=bounded_parser(1000, 5000, max_items=16)
    )
    client = aioredis.Redis(connection_pool=pool)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_value_over_the_limit_becomes_its_length_and_digest(
    guarded: aioredis.Redis, redis_client: aioredis.Redis
) -> None:
    big = bytes(range(256)) * 40  # 10240 bytes
    await redis_client.set("big", big)
    await redis_client.set("small", b"s" * 1000)  # exactly at the limit: kept
    value = await guarded.get("big")
    assert isinstance(value, OmittedValue)
    assert (value.length, value.sha256, value.deferred) == (len(big), hashlib.sha256(big).hexdigest(), False)
    assert value == b""  # it holds nothing
    assert await guarded.get("small") == b"s" * 1000  # the same connection goes on
    assert await guarded.ping()


async def test_values_past_a_replys_budget_are_deferred(
    guarded: aioredis.Redis, redis_client: aioredis.Redis
) -> None:
    for i in range(10):
        await redis_client.xadd("s", {b"payload": bytes([48 + i]) * 900})
    entries = await guarded.xrange("s")
    assert len(entries) == 10  # every id arrives
    values = [f[b"payload"] for _id, f in entries]  # ids and field names are always kept
    kept = [v for v in values if not isinstance(v, OmittedValue)]
    deferred = [v for v in values if isinstance(v, OmittedValue)]
    assert 1 <= len(kept) <= 5
    assert len(kept) + len(deferred) == 10
    assert all(v.deferred for v in deferred)  # type: ignore[attr-defined]
    assert entries[0][1][b"payload"] == b"0" * 900
    # The next reply has a fresh budget.
    [(_id, fields)] = await guarded.xrange("s", entries[-1][0], entries[-1][0])
    assert fields[b"payload"] == b"9" * 900


async def test_ids_and_field_names_are_never_deferred_whatever_is_left_of_the_budget(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # The first entry leaves 10 bytes of the budget: a hostile writer can size entries so.
    pool = aioredis.ConnectionPool.from_url(redis_url, protocol=2, parser_class=bounded_parser(5000, 5000))
    guarded = aioredis.Redis(connection_pool=pool)
    await redis_client.xadd("s", {b"payload": b"x" * 4740}, id="1-0")
    await redis_client.xadd("s", {b"payload": b"y" * 10}, id="2-0")
    try:
        entries = await guarded.xrange("s")
    finally:
        await guarded.aclose()
    assert [entry_id for entry_id, _f in entries] == [b"1-0", b"2-0"]
    assert list(entries[1][1]) == [b"payload"]
    assert entries[1][1][b"payload"] == b"y" * 10


async def test_arrays_over_max_items_are_discarded_and_the_connection_stays_usable(
    guarded: aioredis.Redis, redis_client: aioredis.Redis
) -> None:
    items = [f"item-{i}".encode() for i in range(40)]
    await redis_client.rpush("list", *items)
    name, value = await guarded.lrange("list", 0, -1)
    assert name == b"payload"
    assert isinstance(value, OmittedValue)
    assert value.length == sum(len(i) for i in items)
    assert value.sha256 == hashlib.sha256(b"".join(items)).hexdigest()
    # An entry with too many fields reads as one oversized payload.
    await redis_client.xadd("wide", {f"f{i}".encode(): b"v" for i in range(20)})
    [(_id, fields)] = await guarded.xrange("wide")
    assert list(fields) == [b"payload"]
    assert isinstance(fields[b"payload"], OmittedValue)
    assert await guarded.lrange("list", 0, 2) == items[:3]
    assert await guarded.ping()


async def test_an_array_too_large_to_discard_drops_the_connection_and_names_the_entry(
    guarded: aioredis.Redis, redis_client: aioredis.Redis
) -> None:
    await redis_client.xadd("s", {b"payload": b"ok"}, id="1-0")
    await redis_client.xadd("s", {f"f{i}".encode(): b"v" for i in range(600)}, id="2-0")  # 1200 > 64 * 16
    with pytest.raises(OversizedEntry) as refused:
        await guarded.xrange("s")
    assert (refused.value.entry_id, refused.value.elements) == ("2-0", 1200)
    assert await guarded.xrange("s", "1-0", "1-0") == [(b"1-0", {b"payload": b"ok"})]


def test_the_reply_budget_must_hold_one_value() -> None:
    with pytest.raises(ValueError, match="max_reply_bytes"):
        bounded_parser(1000, 999)
