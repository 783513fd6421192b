"""Giant entries written straight into Redis: dead-lettered ``oversized`` by digest, memory bounded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from oona_helpers import CMD, NORMAL, REPORT, Recorder, command, dead_letters, pending

from esper.core.redis_server import RedisServer
from esper.core.worker import running
from esper.oona import OonaClient

CHILD = Path(__file__).resolve().parent / "oona_memory_child.py"
BIG = 50 * 1024 * 1024


def giant(i: int) -> bytes:
    return bytes([65 + i]) * BIG


@pytest.mark.slow
async def test_six_50mb_entries_are_dead_lettered_by_digest_with_bounded_reader_memory(
    redis_server_factory: Callable[..., RedisServer], make_client: Callable[..., OonaClient]
) -> None:
    server = redis_server_factory()
    raw = aioredis.Redis.from_url(server.url)
    client = make_client(server.url)
    await client.subscribe(NORMAL, "a", Recorder(), types={CMD}).ensure_group()
    giants: dict[str, bytes] = {}
    await client.publish_command(command("good-0"))
    for i in range(6):
        entry_id = (await raw.xadd(NORMAL, {b"payload": giant(i)})).decode()
        giants[entry_id] = hashlib.sha256(giant(i)).hexdigest().encode()
        if i == 2:
            await client.publish_command(command("good-1"))
    many_fields = {f"f{i}".encode(): b"v" for i in range(120_000)}
    fields_bomb = (await raw.xadd(NORMAL, many_fields)).decode()  # type: ignore[arg-type]
    await client.publish_command(command("good-2"))
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), server.url, "3", "7", stdout=subprocess.PIPE
    )
    out, _err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["good"] == ["good-0", "good-1", "good-2"]  # the good ones in the same reads
    # 300 MB went past the reader; it never held more than a small part of it.
    assert result["rss_growth"] < 100 * 1024 * 1024
    assert result["traced_peak"] < 50 * 1024 * 1024
    letters = await dead_letters(raw, 7)
    by_id = {letter[b"source_id"].decode(): letter for letter in letters}
    for entry_id, digest in giants.items():
        letter = by_id[entry_id]
        assert letter[b"reason"] == b"oversized"
        assert b"payload" not in letter  # never copied
        assert letter[b"payload_bytes"] == str(BIG).encode()
        assert letter[b"payload_sha256"] == digest
    assert by_id[fields_bomb][b"reason"] == b"oversized"
    assert by_id[fields_bomb][b"detail"] == b"entry has 240000 fields and values; not read"
    assert b"payload" not in by_id[fields_bomb]
    assert await raw.memory_usage("oona.deadletter") < 1024 * 1024  # type: ignore[operator]
    assert await pending(raw, NORMAL, "a") == 0
    await raw.aclose()


async def test_an_entry_bigger_than_one_read_alone_is_dead_lettered_and_others_are_fetched_again(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    # Each value fits the payload limit, but together the entries exceed one read's budget.
    client = make_client(max_payload_bytes=300_000, max_read_bytes=700_000)
    recorder = Recorder(1)
    sub = client.subscribe(NORMAL, "a", recorder, types={CMD})
    await sub.ensure_group()
    wide = {f"f{i}".encode(): b"x" * 250_000 for i in range(4)}  # 1 MB in one entry: never fits
    ids = [(await redis_client.xadd(NORMAL, {b"payload": b"y" * 250_000})).decode() for _ in range(3)]
    wide_id = (await redis_client.xadd(NORMAL, wide)).decode()  # type: ignore[arg-type]
    await client.publish_command(command("after"))
    async with running(sub.run, "a"):
        letters = await dead_letters(redis_client, 4)
        await recorder.wait()
    by_id = {letter[b"source_id"].decode(): letter for letter in letters}
    assert set(by_id) == {*ids, wide_id}
    assert {letter[b"reason"] for letter in letters} == {b"unsigned", b"oversized"}
    assert by_id[wide_id][b"reason"] == b"oversized"
    assert b"larger than one read" in by_id[wide_id][b"detail"]
    assert all(by_id[i][b"reason"] == b"unsigned" for i in ids)  # read alone, then judged
    assert recorder.ids == ["after"]
    assert await pending(redis_client, NORMAL, "a") == 0


#: Without ignored types a broadcast reader reads with XREAD; with them, through the scan script.
READ_PATHS = pytest.mark.parametrize("ignore", [(), (REPORT,)], ids=["xread", "scan"])


@READ_PATHS
async def test_a_broadcast_reader_skips_an_entry_too_large_to_discard(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, ignore: tuple[int, ...]
) -> None:
    client = make_client()
    recorder = Recorder(2)
    reader = client.broadcast(NORMAL, recorder, types={CMD}, ignore_types=ignore, start_id="0-0")
    await client.publish_command(command("before"))
    await redis_client.xadd(NORMAL, {f"f{i}".encode(): b"v" for i in range(70_000)})  # type: ignore[arg-type]
    await client.publish_command(command("after"))
    async with running(reader.run, "bcast"):
        await recorder.wait()
    assert recorder.ids == ["before", "after"]
    assert client.metrics_snapshot()[f"rejected.{NORMAL}.oversized"] == 1


@READ_PATHS
async def test_a_broadcast_reader_fetches_again_what_one_read_could_not_hold(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, ignore: tuple[int, ...]
) -> None:
    client = make_client(max_payload_bytes=300_000, max_read_bytes=700_000)
    recorder = Recorder(1)
    reader = client.broadcast(NORMAL, recorder, types={CMD}, ignore_types=ignore, start_id="0-0")
    for _ in range(3):
        await redis_client.xadd(NORMAL, {b"payload": b"y" * 250_000})
    wide = {f"f{i}".encode(): b"x" * 250_000 for i in range(4)}  # 1 MB in one entry: never fits
    await redis_client.xadd(NORMAL, wide)  # type: ignore[arg-type]
    await client.publish_command(command("after"))
    async with running(reader.run, "bcast"):
        await recorder.wait()
    snapshot = client.metrics_snapshot()
    assert recorder.ids == ["after"]
    assert snapshot[f"rejected.{NORMAL}.unsigned"] == 3  # each read alone, then judged
    assert snapshot[f"rejected.{NORMAL}.oversized"] == 1
