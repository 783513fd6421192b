"""Housekeeping with idle and lagging groups: nothing a group needs is trimmed, losses are counted once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import CMD, NORMAL, command, policy

from esper.oona import OonaClient
from esper.oona.housekeeping import Housekeeper

POLICY_STREAM = "oona.policy"


async def publish(client: OonaClient, count: int) -> list[str]:
    ids = []
    for i in range(count):
        result = await client.publish_command(command(f"m{i}"))
        assert result.ok
        ids.append(str(result.entry_id))
    return ids


async def read(redis: aioredis.Redis, group: str, consumer: str, count: int) -> list[str]:
    reply = await redis.xreadgroup(group, consumer, {NORMAL: ">"}, count=count)
    return [eid.decode() for _s, entries in reply or [] for eid, _f in entries]


async def touch(redis: aioredis.Redis, group: str, consumer: str) -> None:
    """The consumer reads (its own history, so nothing new is delivered): it is live."""
    await redis.xreadgroup(group, consumer, {NORMAL: "0"}, count=1)


async def stream_ids(redis: aioredis.Redis, key: str = NORMAL) -> list[str]:
    return [eid.decode() for eid, _f in await redis.xrange(key)]


def unread_metric(client: OonaClient, group: str, stream: str = NORMAL) -> float | None:
    return client.metrics.registry.get_sample_value(
        "oona_trimmed_unread_total", {"stream": stream, "group": group}
    )


async def test_pending_entries_and_entries_a_live_group_has_not_read_survive(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(max_stream_length=2, hard_cap=1000, message_ttl_ms=None)
    ids = await publish(client, 6)
    for group in ("a", "b"):
        await client.subscribe(NORMAL, group, _never, types={CMD}).ensure_group()
    assert await read(redis_client, "a", "a-0", 6) == ids
    await redis_client.xack(NORMAL, "a", *[i for i in ids if i != ids[1]])  # ids[1] stays pending in a
    assert await read(redis_client, "b", "b-0", 3) == ids[:3]  # b is live and has not read ids[3:]
    await redis_client.xack(NORMAL, "b", *ids[:3])

    report = await client.housekeeping()
    assert report.trimmed[NORMAL] == 1
    assert await stream_ids(redis_client) == ids[1:]  # the pending entry holds the cut
    await redis_client.xack(NORMAL, "a", ids[1])
    await touch(redis_client, "b", "b-0")
    report = await client.housekeeping()
    assert await stream_ids(redis_client) == ids[3:]  # now b's first unread entry holds it
    assert report.unread_lost == {}
    assert unread_metric(client, "a") is None
    assert unread_metric(client, "b") is None
    assert report.pending[NORMAL] == {"a": 0, "b": 0}


async def test_a_silent_group_stops_pinning_after_the_ttl_and_its_loss_is_counted_once(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    ttl_ms = 300
    client = make_client(message_ttl_ms=ttl_ms, max_stream_length=None, hard_cap=None)
    ids = await publish(client, 5)
    for group in ("live", "idle"):
        await client.subscribe(NORMAL, group, _never, types={CMD}).ensure_group()
    assert await read(redis_client, "idle", "idle-0", 1) == ids[:1]
    await redis_client.xack(NORMAL, "idle", ids[0])
    # This test is about time: the entries and the idle group's consumer grow older than the TTL.
    await asyncio.sleep(2 * ttl_ms / 1000)
    assert await read(redis_client, "live", "live-0", 10) == ids
    await redis_client.xack(NORMAL, "live", *ids)

    report = await client.housekeeping()
    assert report.trimmed[NORMAL] == 5
    assert await redis_client.xlen(NORMAL) == 0
    assert report.unread_lost == {(NORMAL, "idle"): 4}
    assert unread_metric(client, "idle") == 4
    assert unread_metric(client, "live") is None
    again = await client.housekeeping()
    assert again.unread_lost == {}
    assert unread_metric(client, "idle") == 4  # counted once
    # New entries read by the group after its loss are not mistaken for another loss.
    more = await publish(client, 2)
    assert await read(redis_client, "idle", "idle-0", 10) == more
    assert (await client.housekeeping()).unread_lost == {}
    assert client.metrics_snapshot()["trimmed_unread.total"] == 4


async def test_entries_removed_by_the_publish_cap_are_counted_once_per_group(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(hard_cap=10, max_stream_length=None, message_ttl_ms=None)
    await publish(client, 1)
    for group in ("reader", "lagging"):
        await client.subscribe(NORMAL, group, _never, types={CMD}).ensure_group()
    first = await read(redis_client, "lagging", "l-0", 1)
    await redis_client.xack(NORMAL, "lagging", *first)
    await publish(client, 400)  # approximate MAXLEN removes whole nodes as it goes
    assert await read(redis_client, "reader", "r-0", 1000)  # reader keeps up (it reads what is left)
    length = await redis_client.xlen(NORMAL)
    assert length < 400
    report = await client.housekeeping()
    assert report.unread_lost[(NORMAL, "lagging")] == 400 - length
    assert unread_metric(client, "lagging") == 400 - length
    assert (await client.housekeeping()).unread_lost == {}
    assert unread_metric(client, "lagging") == 400 - length


async def test_junk_on_a_stream_nobody_reads_is_trimmed_and_empty_streams_are_fine(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(max_stream_length=3, hard_cap=None, message_ttl_ms=None)
    for i in range(10):
        await redis_client.xadd(POLICY_STREAM, {b"junk": str(i).encode()})
    await redis_client.xadd(NORMAL, {b"x": b"1"})
    await redis_client.xdel(NORMAL, (await stream_ids(redis_client))[0])  # an empty stream
    await redis_client.xgroup_create("oona.telemetry", "nobody", id="0", mkstream=True)  # no consumers
    report = await client.housekeeping()
    assert report.trimmed[POLICY_STREAM] == 7
    assert await redis_client.xlen(POLICY_STREAM) == 3
    assert report.trimmed[NORMAL] == 0
    assert report.pending["oona.telemetry"] == {"nobody": 0}
    assert report.unread_lost == {}


async def test_dead_consumers_holding_nothing_are_removed_others_kept(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    ttl_ms = 300
    client = make_client(message_ttl_ms=ttl_ms, delivery=policy(claim_idle_ms=50, retry_backoff_max_ms=20))
    ids = await publish(client, 2)
    await client.subscribe(NORMAL, "a", _never, types={CMD}).ensure_group()
    assert await read(redis_client, "a", "gone", 1) == ids[:1]
    await redis_client.xack(NORMAL, "a", ids[0])
    assert await read(redis_client, "a", "holding", 1) == ids[1:]  # silent, but holds an entry
    # This test is about time: both consumers stay silent for longer than the expiry.
    await asyncio.sleep(2 * ttl_ms / 1000)
    await touch(redis_client, "a", "live")
    report = await client.housekeeping()
    assert report.consumers_removed == 1
    names = {c["name"] for c in await redis_client.xinfo_consumers(NORMAL, "a")}
    assert names == {b"holding", b"live"}


async def test_a_consumer_is_not_removed_while_its_group_still_pins_the_stream(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    # Removing a silent consumer leaves its group without consumers, and a group without live
    # consumers no longer protects what it has not read: so no consumer is removed before the TTL.
    client = make_client(message_ttl_ms=600_000, max_stream_length=2, hard_cap=None)
    ids = await publish(client, 4)
    await client.subscribe(NORMAL, "a", _never, types={CMD}).ensure_group()
    assert await read(redis_client, "a", "a-0", 1) == ids[:1]
    await redis_client.xack(NORMAL, "a", ids[0])
    assert Housekeeper(client.link).consumer_expiry_ms >= 600_000
    report = await client.housekeeping()
    assert await stream_ids(redis_client) == ids[1:]  # a's unread entries are kept beyond max length
    assert report.consumers_removed == 0


async def _never(message: object) -> None:
    raise AssertionError("housekeeping tests drive groups by hand")
