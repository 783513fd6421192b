"""Refused commits (no memory, a key of the wrong type, a deleted group) never end a reader or lose work."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from oona_helpers import CMD, DLQ, NORMAL, STATE, Recorder, command, command_id, dead_letters, pending

from esper.core.redis_server import RedisServer
from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, Reply
from esper.oona.scripts import COMMIT

READY = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY
COMMIT_SHA = hashlib.sha1(COMMIT.encode()).hexdigest().encode()


async def commit_attempts(monitor: aioredis.client.Monitor) -> AsyncIterator[None]:
    """Yields once per COMMIT script call the server receives (a blocking MONITOR read)."""
    while True:
        info = await monitor.next_command()
        if COMMIT_SHA in info["command"].encode():
            yield


async def break_server(redis: aioredis.Redis, kind: str) -> None:
    if kind == "oom":
        await redis.config_set("maxmemory", 1)  # every write that could grow memory is refused
    else:
        await redis.set(DLQ, b"someone wrote a string here")


async def fix_server(redis: aioredis.Redis, kind: str) -> None:
    if kind == "oom":
        await redis.config_set("maxmemory", 0)
    else:
        await redis.delete(DLQ)


@pytest.mark.parametrize("kind", ["oom", "wrongtype"])
async def test_a_refused_dead_letter_stays_pending_is_reported_and_goes_through_after_the_fix(
    kind: str, redis_server_factory: Callable[..., RedisServer], make_client: Callable[..., OonaClient]
) -> None:
    server = redis_server_factory()
    raw = aioredis.Redis.from_url(server.url)
    client = make_client(server.url)
    replies = (Reply(READY, pb.KernelArtifactReady(request_id="r")),)
    good = Recorder(2, replies)
    sub = client.subscribe(NORMAL, "a", good, types={CMD})
    await sub.ensure_group()
    # Entries are written before the server breaks (an out-of-memory server takes no XADD).
    bad_id = (await raw.xadd(NORMAL, {b"payload": b"unsigned junk"})).decode()
    for name in ("good-1", "good-2"):
        assert (await client.publish_command(command(name))).ok
    await break_server(raw, kind)
    monitor_client = aioredis.Redis.from_url(server.url)
    try:
        async with monitor_client.monitor() as monitor:
            attempts = commit_attempts(monitor)
            async with running(sub.run, "a") as ctx:
                await asyncio.wait_for(anext(attempts), 10)
                await asyncio.wait_for(anext(attempts), 10)  # a second attempt: the first was refused
                assert await pending(raw, NORMAL, "a") == 3
                assert any("cannot commit" in problem for problem in client.problems())
                assert client.metrics_snapshot()[f"commit_failed.{NORMAL}"] >= 1
                await asyncio.wait_for(anext(attempts), 10)  # still retrying: the reader is alive
                assert not ctx.stopping.is_set()
                await fix_server(raw, kind)
                [letter] = await dead_letters(raw, 1)
                while await pending(raw, NORMAL, "a"):
                    await asyncio.wait_for(anext(attempts), 10)
    finally:
        await monitor_client.aclose()
    assert letter[b"reason"] == b"unsigned"
    assert letter[b"source_id"] == bad_id.encode()
    assert good.ids == ["good-1", "good-2"]  # each handled once; the results waited for the commit
    assert await raw.xlen("oona.kernels.ready") == 2
    assert not [p for p in client.problems() if "cannot commit" in p]
    await raw.aclose()


@pytest.mark.parametrize("how", ["group destroyed", "stream deleted"])
async def test_a_group_deleted_while_its_batch_is_handled_is_created_again_and_nothing_is_half_committed(
    how: str, make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    handled: list[str] = []
    deleted, later = asyncio.Event(), asyncio.Event()

    async def handler(message: OonaMessage) -> list[Reply]:
        name = command_id(message)
        handled.append(name)
        if name == "first" and not deleted.is_set():  # someone deletes it, once, mid-batch
            if how == "group destroyed":
                await redis_client.xgroup_destroy(NORMAL, "g")
            else:
                await redis_client.delete(NORMAL)
            deleted.set()
        if name == "later":
            later.set()
        return [Reply(READY, pb.KernelArtifactReady(request_id=name))]

    sub = client.subscribe(NORMAL, "g", handler, types={CMD}, ignore_types={STATE})
    await sub.ensure_group()
    # One batch: a handled entry (claim, reply, ack) and an ignored one (ack only).
    await client.publish_command(command("first"))
    await client.publish_state(pb.SystemStatePacket(timestamp_ns=1))
    async with running(sub.run, "g") as ctx:
        await asyncio.wait_for(deleted.wait(), 10)
        await client.publish_command(command("later"))
        await asyncio.wait_for(later.wait(), 10)
        assert not ctx.stopping.is_set()
    replies = [
        pb.KernelArtifactReady.FromString(pb.BusEnvelope.FromString(fields[b"payload"]).payload).request_id
        for _id, fields in await redis_client.xrange("oona.kernels.ready")
    ]
    # The refused commit wrote nothing; what was still in the stream came again and was answered once.
    assert replies == (["first", "later"] if how == "group destroyed" else ["later"])
    assert client.metrics_snapshot()[f"lost.{NORMAL}"] == 2
    assert await pending(redis_client, NORMAL, "g") == 0
