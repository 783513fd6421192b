"""Consumers killed with SIGKILL: poison after max deliveries, one reply, resume under a stable name."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_child import READY, spawn, wait_for_event
from oona_helpers import CMD, NORMAL, Recorder, command, dead_letters, pending, policy, read_stream

from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, Reply


async def test_a_handler_whose_process_dies_every_time_ends_as_poison(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, redis_url: str
) -> None:
    client = make_client(instance="b-0")
    other_group = Recorder(1)
    sub_b = client.subscribe(NORMAL, "b", other_group, types={CMD})
    published = await client.publish_command(command("kills its consumer"))
    attempts = []
    async with running(sub_b.run, "b"):
        await other_group.wait()
        for _ in range(3):  # QUICK policy: max_deliveries = 3
            child = spawn("die", redis_url, "a-0")
            seen = await wait_for_event(child, "handling")
            assert await asyncio.to_thread(child.wait) == -signal.SIGKILL
            attempts.append(seen[-1]["attempt"])
        survivor = spawn("die", redis_url, "a-0")  # delivery 4 is not handled: poison
        try:
            [letter] = await dead_letters(redis_client, 1, limit_s=20)
        finally:
            survivor.kill()
            survivor.wait()
    assert attempts == [1, 2, 3]
    assert letter[b"reason"] == b"poison"
    assert letter[b"group"] == b"a"
    assert letter[b"source_id"] == published.entry_id.encode()  # type: ignore[union-attr]
    assert letter[b"detail"] == b"delivered 3 times without finishing"
    assert await pending(redis_client, NORMAL, "a") == 0
    assert other_group.ids == ["kills its consumer"]  # group b handled it once, unaffected


async def test_a_consumer_killed_between_handler_and_commit_yields_exactly_one_reply(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, redis_url: str
) -> None:
    client = make_client(instance="a-0")
    published = await client.publish_command(command("reply once"))
    child = spawn("pause", redis_url, "a-0")
    try:
        # The handler has run and returned its reply; the server takes no writes, so the commit
        # cannot happen before the process dies.
        await wait_for_event(child, "paused")
    finally:
        child.kill()
        child.wait()
    await redis_client.execute_command("CLIENT", "UNPAUSE")
    assert await redis_client.xlen("oona.kernels.ready") == 0
    assert await pending(redis_client, NORMAL, "a") == 1
    attempts: list[int] = []

    async def handler(message: OonaMessage) -> list[Reply]:
        attempts.append(message.attempt)
        return [Reply(READY, pb.KernelArtifactReady(request_id=message.entry_id))]

    sub = client.subscribe(NORMAL, "a", handler, types={CMD})  # the same consumer name, restarted
    async with running(sub.run, "a"):
        [(_id, _fields)] = await read_stream(redis_client, "oona.kernels.ready", 1)
        await client.publish_command(command("after"))
        await read_stream(redis_client, "oona.kernels.ready", 1, after=_id)
    assert attempts == [2, 1]
    replies = await redis_client.xrange("oona.kernels.ready")
    request_ids = [
        pb.KernelArtifactReady.FromString(pb.BusEnvelope.FromString(f[b"payload"]).payload).request_id
        for _i, f in replies
    ]
    assert request_ids.count(published.entry_id) == 1  # type: ignore[arg-type]
    assert len(request_ids) == 2
    assert await pending(redis_client, NORMAL, "a") == 0


async def test_a_restarted_consumer_resumes_its_own_pending_entries_at_once(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, redis_url: str
) -> None:
    claim_idle_ms = 60_000
    client = make_client(instance="a-0")
    ids = [(await client.publish_command(command(f"m{i}"))).entry_id for i in range(3)]
    child = spawn("hang", redis_url, "a-0", claim_idle_ms)
    try:
        await wait_for_event(child, "handling")  # one handler hangs, the batch is pending under a-0
    finally:
        child.kill()
        child.wait()
    consumers = {c["name"]: c["pending"] for c in await redis_client.xinfo_consumers(NORMAL, "a")}
    assert consumers == {b"a-0": 3}
    recorder = Recorder(3)
    sub = client.subscribe(NORMAL, "a", recorder, types={CMD}, policy=policy(claim_idle_ms=claim_idle_ms))
    started = time.monotonic()
    async with running(sub.run, "a"):
        await recorder.wait()
    # Behaviour about time: resumed at once, not after a claim (generous bound).
    assert time.monotonic() - started < claim_idle_ms / 1000 / 4
    assert sorted(m.entry_id for m in recorder.messages) == sorted(i for i in ids if i)
    assert [m.attempt for m in recorder.messages] == [2, 2, 2]
    assert await pending(redis_client, NORMAL, "a") == 0


async def test_another_replica_takes_over_a_dead_consumers_entries_after_claim_idle(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, redis_url: str
) -> None:
    client = make_client(instance="a-1")
    await client.publish_command(command("orphan"))
    child = spawn("hang", redis_url, "a-0", 300)
    try:
        await wait_for_event(child, "handling")
    finally:
        child.kill()
        child.wait()
    recorder = Recorder(1)
    sub = client.subscribe(NORMAL, "a", recorder, types={CMD}, policy=policy(claim_idle_ms=300))
    async with running(sub.run, "a"):
        await recorder.wait()
    assert recorder.ids == ["orphan"]
    assert recorder.messages[0].attempt == 2
    assert client.metrics_snapshot()[f"claimed.{NORMAL}"] == 1
    assert await pending(redis_client, NORMAL, "a") == 0


async def test_a_live_consumer_keeps_its_slow_entries_from_being_taken_over(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    slow_client, other_client = make_client(instance="a-0"), make_client(instance="a-1")
    fast = policy(claim_idle_ms=150, handler_timeout_ms=5_000, batch=4)
    release, handled = asyncio.Event(), Recorder(4)
    stolen: list[str] = []
    started = asyncio.Event()

    async def slow(message: OonaMessage) -> None:
        started.set()
        await release.wait()
        await handled(message)

    async def thief(message: OonaMessage) -> None:
        stolen.append(message.entry_id)

    for i in range(4):
        await slow_client.publish_command(command(f"m{i}"))
    sub = slow_client.subscribe(NORMAL, "a", slow, types={CMD}, policy=fast)
    other = other_client.subscribe(NORMAL, "a", thief, types={CMD}, policy=fast)
    async with running(sub.run, "a0"):
        await asyncio.wait_for(started.wait(), 10)  # all four are held by a-0 now, one running
        async with running(other.run, "a1"):
            # The behaviour is about time: several claim periods pass while a-0's handler and
            # the rest of its batch wait.
            await asyncio.sleep(6 * fast.claim_idle_ms / 1000)
            release.set()
            await handled.wait()
    assert stolen == []
    assert [m.attempt for m in handled.messages] == [1, 1, 1, 1]
