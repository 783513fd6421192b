"""Cluster hash-tag mode (every key in one slot) and the scripts' edge cases on real servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import CMD, NORMAL, Recorder, command, dead_letters, pending

from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, Reply

TAGGED = "{esper}oona.normal"


async def test_the_whole_bus_works_with_a_hash_tag(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(hash_tag="esper", max_stream_length=5, hard_cap=1000)
    reply = Reply(pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY, pb.KernelArtifactReady(request_id="r"))
    handled = {"a": Recorder(1, (reply,)), "b": Recorder(1)}
    subs = [client.subscribe(NORMAL, g, r, types={CMD}) for g, r in handled.items()]
    async with running(subs[0].run, "a"), running(subs[1].run, "b"):
        result = await client.publish_command(command("tagged"))
        await asyncio.gather(*(r.wait() for r in handled.values()))
        await redis_client.xadd(TAGGED, {b"payload": b"junk"})
        letters = await dead_letters(redis_client, 2, key="{esper}oona.deadletter")
        [(_id, fields)] = await redis_client.xrange(TAGGED, count=1)
        await redis_client.xadd(TAGGED, fields)  # type: ignore[arg-type]  # a copy
        letters += await dead_letters(redis_client, 4, key="{esper}oona.deadletter")
    assert result.stream == NORMAL
    assert await redis_client.exists("oona.normal", "oona.deadletter", "oona.kernels.ready") == 0
    assert await redis_client.xlen("{esper}oona.kernels.ready") == 1
    assert sorted(letter[b"reason"] for letter in letters[2:]) == [
        b"replay",
        b"replay",
        b"unsigned",
        b"unsigned",
    ]
    assert all(letter[b"source_stream"] == NORMAL.encode() for letter in letters)
    replay_keys = [key async for key in redis_client.scan_iter(match="*oona:replay:*")]
    assert replay_keys
    assert all(key.startswith(b"{esper}") for key in replay_keys)
    report = await client.housekeeping()
    assert report.pending[NORMAL] == {"a": 0, "b": 0}
    assert await pending(redis_client, TAGGED, "a") == 0


async def test_scripts_on_empty_deleted_and_groupless_streams(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(max_stream_length=1, message_ttl_ms=1, hard_cap=None)
    # Nothing exists at all.
    report = await client.housekeeping()
    assert set(report.trimmed.values()) == {0}
    # A group on a stream whose entries were all deleted (lag becomes unknown).
    recorder = Recorder(1)
    sub = client.subscribe(NORMAL, "a", recorder, types={CMD})
    await sub.ensure_group()
    await sub.ensure_group()  # an existing group is kept
    first = await redis_client.xadd(NORMAL, {b"x": b"1"})
    await redis_client.xadd(NORMAL, {b"x": b"2"})
    await redis_client.xdel(NORMAL, first)
    await redis_client.xgroup_create(NORMAL, "no-consumers", id="$")
    report = await client.housekeeping()
    assert report.pending[NORMAL] == {"a": 0, "no-consumers": 0}
    # A pending entry deleted before it is handled is simply acknowledged.
    async with running(sub.run, "a"):
        await client.publish_command(command("ok"))
        await recorder.wait()
    await redis_client.xgroup_create("oona.policy", "p", id="0", mkstream=True)
    await redis_client.xadd("oona.policy", {b"x": b"gone"})
    [[_s, [(gone_id, _f)]]] = await redis_client.xreadgroup("p", "test-0", {"oona.policy": ">"})
    await redis_client.xdel("oona.policy", gone_id)
    updates = Recorder(1)
    policy_sub = client.subscribe("oona.policy", "p", updates, types={pb.BUS_MESSAGE_TYPE_POLICY_UPDATE})
    async with running(policy_sub.run, "p"):  # own pending entries are taken up before new reads
        await client.publish_policy_update(pb.PolicyUpdate(version=2))
        await updates.wait()
    assert await pending(redis_client, "oona.policy", "p") == 0
    letters = [f for _id, f in await redis_client.xrange("oona.deadletter")]
    assert [f[b"reason"] for f in letters] == [b"malformed"]  # the {x: 2} entry, not the deleted one
