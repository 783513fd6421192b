"""The embedded server: real child processes, SIGKILLed and restarted with their data."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from esper.core.redis_server import RedisServerError
from esper.weatherlight.embedded_redis import EmbeddedRedis
from esper.weatherlight.supervisor import BackoffPolicy, Supervisor, WorkerContext, WorkerSpec

FAST = BackoffPolicy(base_s=0.05, cap_s=0.5, jitter=0.1)


async def wait_for_new_pid(embedded: EmbeddedRedis, old_pid: int, within_s: float = 15.0) -> None:
    end = time.monotonic() + within_s
    while not (embedded.running and embedded.pid != old_pid):
        assert time.monotonic() < end, "embedded redis was not restarted"
        await asyncio.sleep(0.02)


async def roundtrip(url: str, key: str, value: str | None = None) -> bytes | None:
    client = aioredis.Redis.from_url(url)
    try:
        if value is not None:
            await client.set(key, value)
        got: bytes | None = await client.get(key)
        return got
    finally:
        await client.aclose()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_context_manager_restarts_killed_child_on_same_port_with_data(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path, restart_backoff=FAST)
    port_file = tmp_path / "redis" / "port"
    assert int(port_file.read_text()) == embedded.port
    async with embedded:
        url = embedded.url
        assert await roundtrip(url, "graft", "seed-1") == b"seed-1"
        pid = embedded.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_for_new_pid(embedded, pid)
        assert embedded.url == url
        assert await roundtrip(url, "graft") == b"seed-1"  # append-only file replayed
        assert embedded.restarts == 1
        assert embedded.unexpected_exits == 1
        last_pid = embedded.pid
    assert last_pid is not None
    assert not alive(last_pid)
    assert not embedded.running
    assert (tmp_path / "redis" / "appendonlydir").is_dir() or any((tmp_path / "redis").glob("*.aof"))


async def test_port_is_persisted_across_instances(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    async with first:
        await roundtrip(first.url, "k", "v")
    second = EmbeddedRedis(tmp_path)
    assert second.port == first.port
    async with second:
        assert await roundtrip(second.url, "k") == b"v"


async def test_as_supervised_worker_restarted_by_supervisor_and_stopped_last(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path)
    order: list[str] = []

    async def client_worker(ctx: WorkerContext) -> None:
        await ctx.stopping.wait()
        order.append("client stopped" if embedded.running else "client stopped after redis")

    sup = Supervisor(FAST)
    await sup.start(
        [WorkerSpec("redis", embedded.run_worker, wait_ready=True), WorkerSpec("oona", client_worker)]
    )
    assert await roundtrip(embedded.url, "bus", "up") == b"up"
    pid = embedded.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_for_new_pid(embedded, pid)
    assert await roundtrip(embedded.url, "bus") == b"up"
    assert sup.worker("redis")["last_error"] == "EmbeddedRedisExited: embedded redis exited with code -9"
    last_pid = embedded.pid
    result = await sup.shutdown(10)
    assert result.clean
    assert order == ["client stopped"]  # redis outlived its client: stopped last
    assert last_pid is not None
    assert not alive(last_pid)


async def test_start_failure_is_reported_and_leaves_no_child(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        (tmp_path / "redis").mkdir()
        (tmp_path / "redis" / "port").write_text(f"{squatter.getsockname()[1]}\n")  # port taken
        embedded = EmbeddedRedis(tmp_path, start_timeout_s=5)
        with pytest.raises(RedisServerError, match="did not start"):
            await embedded.start()
    assert not embedded.running
