"""Test harness: a real Redis-protocol server and real SQL databases.

A session-wide server comes from ``ESPER_TEST_REDIS_URL`` when set (it must be
a disposable server: tests flush databases 1-15), otherwise a private
``valkey-server`` is started on a free loopback port with persistence off and
stopped at the end. Each test gets its own logical database, flushed first,
so keyspaces never leak between tests.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.asyncio as aioredis
from _postgres import private_schema

from esper.core.redis_server import RedisServer, ServerOptions

TEST_SECRET = "test-secret-for-esper-lite-0123456789"
_DB_CYCLE = itertools.cycle(range(1, 16))


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("ESPER_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(ServerOptions(data_dir=tmp_path_factory.mktemp("redis-session")))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """A URL to an empty logical database of the session server."""
    url = _with_db(redis_server_url, next(_DB_CYCLE))
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start private servers (for restart and crash tests); all are stopped afterwards."""
    servers: list[RedisServer] = []

    def start(append_only: bool = False, port: int = 0) -> RedisServer:
        data = tmp_path / f"redis-{len(servers)}"
        server = RedisServer(ServerOptions(data_dir=data, append_only=append_only, port=port))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", TEST_SECRET)
    monkeypatch.delenv("ESPER_LEYLINE_PREVIOUS_SECRETS", raising=False)
    return TEST_SECRET


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in an empty directory with no Esper variables inherited from the caller."""
    prefixes = ("ESPER_", "OONA_", "URZA_", "TAMIYO_", "WEATHERLIGHT_", "KERNEL_", "ESP_")
    for name in list(os.environ):
        inherited = name.startswith(prefixes) or name == "REDIS_URL"
        if inherited and not name.startswith("ESPER_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get("ESPER_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("ESPER_TEST_POSTGRES_URL is not set")
    yield from _postgres_schema(url)


def _postgres_schema(url: str) -> Iterator[str]:
    """A private schema per test, dropped afterwards, so tests never see each other's rows."""
    with private_schema(url) as schema_url:
        yield schema_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A real SQL database: a SQLite file, and PostgreSQL when configured."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    url = os.environ.get("ESPER_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("ESPER_TEST_POSTGRES_URL is not set")
    yield from _postgres_schema(url)
