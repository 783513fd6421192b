"""Groups on one stream: each sees every entry once; failures are retried inside their own group."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import (
    CMD,
    NORMAL,
    REPORT,
    Recorder,
    command,
    command_id,
    dead_letters,
    pending,
    policy,
    read_stream,
)

from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, Reply


async def test_two_groups_each_handle_every_entry_once_and_replicas_share_one_group(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    a0, a1, b0 = (make_client(instance=name) for name in ("a-0", "a-1", "b-0"))
    seen: dict[str, list[str]] = {"a-0": [], "a-1": [], "b-0": []}
    all_a, all_b = asyncio.Event(), asyncio.Event()

    def handler(name: str) -> Callable[[OonaMessage], object]:
        async def handle(message: OonaMessage) -> None:
            seen[name].append(command_id(message))
            if len(seen["a-0"]) + len(seen["a-1"]) >= 40:
                all_a.set()
            if len(seen["b-0"]) >= 40:
                all_b.set()

        return handle

    subs = [
        a0.subscribe(NORMAL, "a", handler("a-0"), types={CMD}, policy=policy(batch=2)),  # type: ignore[arg-type]
        a1.subscribe(NORMAL, "a", handler("a-1"), types={CMD}, policy=policy(batch=2)),  # type: ignore[arg-type]
        b0.subscribe(NORMAL, "b", handler("b-0"), types={CMD}),  # type: ignore[arg-type]
    ]
    async with running(subs[0].run, "a0"), running(subs[1].run, "a1"), running(subs[2].run, "b0"):
        for i in range(40):
            assert (await a0.publish_command(command(f"m{i}"))).ok
        await asyncio.wait_for(asyncio.gather(all_a.wait(), all_b.wait()), 10)
    expected = sorted(f"m{i}" for i in range(40))
    assert sorted(seen["a-0"] + seen["a-1"]) == expected  # each entry once in group a
    assert sorted(seen["b-0"]) == expected
    groups = {g["name"]: g for g in await redis_client.xinfo_groups(NORMAL)}
    assert set(groups) == {b"a", b"b"}
    assert all(g["pending"] == 0 for g in groups.values())
    # A group exists only on the stream it reads.
    assert await redis_client.exists("oona.telemetry", "oona.policy") == 0


async def test_failing_group_retries_inside_itself_and_the_other_group_handles_once(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    attempts: list[tuple[str, int, int]] = []
    b_done = Recorder(1)
    a_done = asyncio.Event()

    async def flaky(message: OonaMessage) -> None:
        [row] = await redis_client.xpending_range(NORMAL, "a", message.entry_id, message.entry_id, 1)
        attempts.append((message.entry_id, message.attempt, int(row["times_delivered"])))
        if message.attempt < 3:
            raise RuntimeError("not yet")
        a_done.set()

    sub_a = client.subscribe(NORMAL, "a", flaky, types={CMD}, policy=policy(max_deliveries=5))
    sub_b = client.subscribe(NORMAL, "b", b_done, types={CMD})
    async with running(sub_a.run, "a"), running(sub_b.run, "b"):
        published = await client.publish_command(command("once"))
        await asyncio.wait_for(a_done.wait(), 10)
        await b_done.wait()
    assert [(eid, attempt) for eid, attempt, _count in attempts] == [
        (published.entry_id, 1),
        (published.entry_id, 2),
        (published.entry_id, 3),
    ]
    assert all(attempt == count for _eid, attempt, count in attempts)  # attempt = delivery count
    assert b_done.ids == ["once"]
    assert await redis_client.xlen(NORMAL) == 1  # nothing was re-published
    assert await redis_client.xlen("oona.deadletter") == 0
    assert client.metrics_snapshot()[f"retries.{NORMAL}"] == 2
    assert await pending(redis_client, NORMAL, "a") == 0


async def test_a_handler_that_always_fails_is_dead_lettered_after_max_deliveries(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    attempts: list[int] = []

    async def failing(message: OonaMessage) -> None:
        attempts.append(message.attempt)
        raise RuntimeError("secret-looking text must not reach the dead letter")

    b_done = Recorder(1)
    sub_a = client.subscribe(NORMAL, "a", failing, types={CMD}, policy=policy(max_deliveries=4))
    sub_b = client.subscribe(NORMAL, "b", b_done, types={CMD})
    async with running(sub_a.run, "a"), running(sub_b.run, "b"):
        await client.publish_command(command("doomed"))
        [letter] = await dead_letters(redis_client, 1)
        await b_done.wait()
    assert attempts == [1, 2, 3, 4]
    assert letter[b"reason"] == b"handler_failed"
    assert letter[b"group"] == b"a"
    assert letter[b"detail"] == b"RuntimeError on delivery 4"
    envelope = pb.BusEnvelope.FromString(letter[b"payload"])
    assert pb.AdaptationCommand.FromString(envelope.payload).command_id == "doomed"
    assert client.consume_breaker.state == pb.CIRCUIT_STATE_CLOSED  # handler bugs are not Redis failures
    assert b_done.ids == ["doomed"]
    assert await pending(redis_client, NORMAL, "a") == 0


async def test_a_hanging_handler_ends_as_handler_timeout(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    attempts: list[int] = []
    good = Recorder(1)

    async def hang(message: OonaMessage) -> None:
        if command_id(message) == "good":
            await good(message)
            return
        attempts.append(message.attempt)
        await asyncio.Event().wait()

    sub = client.subscribe(
        NORMAL, "a", hang, types={CMD}, policy=policy(handler_timeout_ms=50, max_deliveries=3)
    )
    async with running(sub.run, "a"):
        await client.publish_command(command("hangs"))
        await client.publish_command(command("good"))
        [letter] = await dead_letters(redis_client, 1)
        await good.wait()
    assert attempts == [1, 2, 3]
    assert letter[b"reason"] == b"handler_timeout"
    assert letter[b"detail"] == b"no result within 50 ms on delivery 3"
    assert await pending(redis_client, NORMAL, "a") == 0


async def test_replies_commit_with_the_ack_and_route_by_type_and_priority(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    replies = (
        Reply(REPORT, pb.FieldReport(report_id="r")),
        Reply(pb.BUS_MESSAGE_TYPE_TELEMETRY, pb.TelemetryPacket(), priority=pb.MESSAGE_PRIORITY_HIGH),
        Reply(pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY, pb.KernelArtifactReady(request_id="q")),
    )
    recorder = Recorder(1, replies)
    sub = client.subscribe(NORMAL, "g", recorder, types={CMD})
    async with running(sub.run, "g"):
        await client.publish_command(command("go"))
        await recorder.wait()
        [(_id, report)] = [e for e in await read_stream(redis_client, NORMAL, 2) if e[0] != _first(recorder)]
        [(_id, urgent)] = await read_stream(redis_client, "oona.emergency", 1)
        [(_id, ready)] = await read_stream(redis_client, "oona.kernels.ready", 1)
    for fields, kind in ((report, REPORT), (urgent, pb.BUS_MESSAGE_TYPE_TELEMETRY)):
        assert client.keyring.verify(fields[b"payload"], fields[b"signature"], fields[b"kid"].decode())
        assert pb.BusEnvelope.FromString(fields[b"payload"]).message_type == kind
    assert pb.BusEnvelope.FromString(ready[b"payload"]).attributes["nonce"]
    assert client.metrics_snapshot()["published.oona.emergency"] == 1
    assert await pending(redis_client, NORMAL, "g") == 0


def _first(recorder: Recorder) -> str:
    return recorder.messages[0].entry_id


async def test_concurrent_handlers_are_bounded_and_a_slow_one_holds_back_no_commit(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    active = peak = 0
    release, crowded = asyncio.Event(), asyncio.Event()
    commits: asyncio.Queue[list[str]] = asyncio.Queue()

    async def handler(message: OonaMessage) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 3:
            crowded.set()
        try:
            if command_id(message) == "slow":
                await release.wait()
            else:
                await crowded.wait()  # the first ones wait until the limit is reached
        finally:
            active -= 1

    sub = client.subscribe(
        NORMAL,
        "g",
        handler,
        types={CMD},
        policy=policy(concurrency=3, batch=12),
        on_committed=commits.put_nowait,
    )
    slow = (await client.publish_command(command("slow"))).entry_id
    fast = {(await client.publish_command(command(f"f{i}"))).entry_id for i in range(11)}
    committed: set[str] = set()
    async with running(sub.run, "g"):
        while committed != fast:  # every fast one commits while the slow handler still runs
            committed |= set(await asyncio.wait_for(commits.get(), 10))
        release.set()
        assert await asyncio.wait_for(commits.get(), 10) == [slow]
    assert peak == 3
    assert await pending(redis_client, NORMAL, "g") == 0


async def test_handlers_that_finish_together_share_one_commit(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    commits: asyncio.Queue[list[str]] = asyncio.Queue()

    async def handler(message: OonaMessage) -> None:
        return None  # finishes without waiting for anything, as a cached answer does

    sub = client.subscribe(
        NORMAL,
        "g",
        handler,
        types={CMD},
        policy=policy(concurrency=8, batch=8),
        on_committed=commits.put_nowait,
    )
    await sub.ensure_group()
    published = {(await client.publish_command(command(f"c{i}"))).entry_id for i in range(8)}
    async with running(sub.run, "g"):
        first = await asyncio.wait_for(commits.get(), 10)
    assert set(first) == published  # one round trip for the batch, not one for the first alone
    assert await pending(redis_client, NORMAL, "g") == 0
