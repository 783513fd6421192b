"""Crash and restart: nothing lost, nothing handled twice after success."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import Recorder, running

from esper.core.redis_server import RedisServer, ServerOptions
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage

CMD = pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
STREAM = "oona.normal"


async def test_killed_consumer_pending_entries_are_claimed_and_processed(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    first = make_client(consumer="dies", retry_idle_ms=300)
    second = make_client(consumer="survives", retry_idle_ms=300)
    await first.ensure_consumer_groups()
    for i in range(6):
        await first.publish_command(pb.AdaptationCommand(command_id=f"m{i}"))
    handled: list[str] = []
    blocked = asyncio.Event()

    async def stuck_on_third(message: OonaMessage) -> None:
        command_id = message.decode(pb.AdaptationCommand).command_id
        if command_id == "m2":
            blocked.set()
            await asyncio.Event().wait()  # blocks until cancelled
        handled.append(command_id)

    doomed = first.consumer(STREAM, stuck_on_third, types={CMD}, batch=6)
    task = asyncio.create_task(doomed.run())
    await asyncio.wait_for(blocked.wait(), 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert handled == ["m0", "m1"]
    # m0 and m1 succeeded before the crash and were acked; m2..m5 are left pending.
    pending = await redis_client.xpending(STREAM, "test")
    assert pending["pending"] == 4

    rest = Recorder(4)

    async def record(message: OonaMessage) -> None:
        handled.append(message.decode(pb.AdaptationCommand).command_id)
        await rest(message)

    async with running(second.consumer(STREAM, record, types={CMD})):
        await rest.wait()
    assert sorted(handled) == [f"m{i}" for i in range(6)]  # none lost, none twice
    assert (await redis_client.xpending(STREAM, "test"))["pending"] == 0
    assert await redis_client.xlen("oona.deadletter") == 0


async def test_graceful_stop_finishes_in_flight_and_acks(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    await client.ensure_consumer_groups()
    started = asyncio.Event()
    release = asyncio.Event()
    finished: list[str] = []

    async def slow(message: OonaMessage) -> None:
        started.set()
        await release.wait()
        finished.append(message.entry_id)

    await client.publish_command(pb.AdaptationCommand())
    consumer = client.consumer(STREAM, slow, types={CMD})
    async with asyncio.TaskGroup() as group:
        group.create_task(consumer.run())
        await asyncio.wait_for(started.wait(), 10)
        stopper = group.create_task(consumer.stop())
        await asyncio.sleep(0)
        assert not stopper.done()
        release.set()
    assert len(finished) == 1
    assert (await redis_client.xpending(STREAM, "test"))["pending"] == 0


async def test_server_restart_with_append_only_loses_nothing(
    redis_server_factory: Callable[..., RedisServer], make_client: Callable[..., OonaClient]
) -> None:
    server = redis_server_factory(append_only=True)
    data_dir, port = server.options.data_dir, server.port
    publisher = make_client(server.url, breaker_timeout_ms=100)
    consumer_client = make_client(server.url, reconnect_base_ms=20, reconnect_max_ms=200)
    await publisher.ensure_consumer_groups()
    total = 60
    got: set[str] = set()
    all_in = asyncio.Event()

    async def handler(message: OonaMessage) -> None:
        got.add(message.decode(pb.AdaptationCommand).command_id)
        if len(got) == total:
            all_in.set()

    async def publish(i: int) -> None:
        # While the server is down the publish breaker opens and each retry waits for it.
        while not (await publisher.publish_command(pb.AdaptationCommand(command_id=f"c{i}"))).ok:
            pass

    consumer = consumer_client.consumer(STREAM, handler, types={CMD}, batch=5)
    restarted: RedisServer | None = None
    try:
        async with running(consumer):
            for i in range(total // 2):
                await publish(i)
            server.kill()  # SIGKILL: appended writes are in the AOF file (page cache) already
            restarted = RedisServer(ServerOptions(data_dir=data_dir, append_only=True, port=port))
            await asyncio.to_thread(restarted.start)
            for i in range(total // 2, total):
                await publish(i)
            await asyncio.wait_for(all_in.wait(), 20)
    finally:
        if restarted is not None:
            restarted.stop()
    assert got == {f"c{i}" for i in range(total)}
    assert consumer.reconnects >= 1
