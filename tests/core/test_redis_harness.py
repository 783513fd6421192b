"""The harness talks to a real Redis-protocol server with an isolated keyspace per test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from esper.core.redis_server import RedisServer, RedisServerError, ServerOptions, find_server_binary


async def test_real_server_round_trip(redis_client: aioredis.Redis) -> None:
    assert await redis_client.dbsize() == 0
    entry = await redis_client.xadd("harness.stream", {"k": "v"})
    rows = await redis_client.xrange("harness.stream")
    assert rows == [(entry, {b"k": b"v"})]
    info = await redis_client.info("server")
    assert "redis_version" in info or "valkey_version" in info


async def test_each_test_starts_with_an_empty_keyspace(redis_client: aioredis.Redis) -> None:
    assert await redis_client.exists("harness.stream") == 0


def test_private_server_persists_with_append_only(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory(append_only=True)
    client = redis.Redis.from_url(server.url)
    client.xadd("s", {"n": "1"})
    client.close()
    port = server.port
    server.kill()
    assert not server.running
    restarted = RedisServer(ServerOptions(data_dir=server.options.data_dir, append_only=True, port=port))
    restarted.start()
    try:
        client = redis.Redis.from_url(restarted.url)
        assert client.xlen("s") == 1
        client.close()
    finally:
        restarted.stop()


def test_server_binary_is_found() -> None:
    assert Path(find_server_binary()).exists()


def test_start_failure_is_reported(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-server"
    bogus.write_text("#!/bin/sh\necho boom\nexit 3\n")
    bogus.chmod(0o755)
    with pytest.raises(RedisServerError, match="boom"):
        RedisServer(ServerOptions(data_dir=tmp_path / "d"), binary=str(bogus)).start()
