"""Start-up checks, all run and all reported together.

An operator fixing a broken deployment should see every problem at once:
a missing secret, an unreachable Redis, an unusable catalogue database, an
unwritable artifact directory, a busy HTTP port and another service already
running in the var dir are collected into one ``PreflightError``.
Messages name settings, hosts, ports and pids, never secrets or URL passwords.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, RedisClusterException
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from esper.core.errors import ConfigError
from esper.core.instance_lock import AlreadyRunning, ensure_free
from esper.core.redact import mask_url
from esper.core.redis_server import RedisServerError, find_server_binary, port_in_use
from esper.core.settings import EsperSettings
from esper.oona import StreamConfig, connect
from esper.urza import normalize_database_url


class PreflightError(Exception):
    """One or more start-up checks failed; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("preflight failed:\n  - " + "\n  - ".join(problems))


@dataclass
class PreflightReport:
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def raise_if_failed(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)


async def check_redis(url: str, timeout_s: float = 3.0) -> str | None:
    """``None`` when the bus's server answers PING (standalone, Sentinel or Cluster), else why not."""
    try:
        client = connect(url, StreamConfig(instance="preflight"))
    except ValueError as exc:
        return f"REDIS_URL {mask_url(url)} is not usable: {exc}"
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except (AuthenticationError, NoPermissionError) as exc:
        where = mask_url(url)
        return f"Redis at {where} refused the login ({type(exc).__name__}): check the user and password"
    except (OSError, TimeoutError, aioredis.RedisError, RedisClusterException) as exc:
        return f"Redis at {mask_url(url)} is unreachable ({type(exc).__name__})"
    finally:
        await client.aclose()
    return None


def check_catalog(database_url: str) -> str | None:
    """``None`` when the catalogue database accepts a connection (a SQLite file may be created)."""
    url = normalize_database_url(database_url)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"URZA_DATABASE_URL: cannot create {path.parent} ({exc.strerror})"
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        where = mask_url(database_url)
        return f"URZA_DATABASE_URL: catalogue at {where} is unreachable ({type(exc).__name__})"
    finally:
        engine.dispose()
    return None


def check_writable(directory: Path, setting: str) -> str | None:
    """``None`` when a file can be created, synced and removed in ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".preflight-") as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return f"{setting}: {directory} is not writable ({exc.strerror or type(exc).__name__})"
    return None


def check_http_port(host: str, port: int) -> str | None:
    """``None`` when the probe server can bind ``host:port`` (port 0 always can)."""
    if port == 0:
        return None
    try:
        busy = port_in_use(host, port)
    except OSError as exc:  # e.g. an address this host does not have
        return (
            f"WEATHERLIGHT_HTTP_HOST/PORT: cannot bind {host}:{port} ({exc.strerror or type(exc).__name__})"
        )
    if busy:
        return f"WEATHERLIGHT_HTTP_PORT: {host}:{port} is already in use by another process"
    return None


def check_instance(var_dir: Path) -> str | None:
    """``None`` when no other service holds ``var_dir`` (see ``esper.core.instance_lock``)."""
    try:
        ensure_free(var_dir)
    except AlreadyRunning as exc:
        return f"ESPER_VAR_DIR: another esper-weatherlight-service is {exc}"
    except OSError as exc:  # e.g. the var dir is a file, or the lock file a directory
        why = exc.strerror or type(exc).__name__
        return f"ESPER_VAR_DIR: cannot use the lock file under {var_dir} ({why})"
    return None


async def run_preflight(settings: EsperSettings, *, check_bus: bool = True) -> PreflightReport:
    """Run every check; ``check_bus`` is false when the embedded server is not started yet."""
    report = PreflightReport()

    def record(name: str, problem: str | None) -> None:
        if problem is None:
            report.passed.append(name)
        else:
            report.problems.append(problem)

    try:
        settings.signing_secrets()
        record("secret", None)
    except ConfigError as exc:
        report.problems.extend(exc.problems)
    record("instance", check_instance(settings.var_dir))
    record("http port", check_http_port(settings.weatherlight_http_host, settings.weatherlight_http_port))
    if settings.redis_url is None:
        try:
            find_server_binary()
            record("embedded redis binary", None)
        except RedisServerError as exc:
            record("embedded redis binary", str(exc))
        record("var dir", check_writable(settings.var_dir, "ESPER_VAR_DIR"))
    elif check_bus:
        record("redis", await check_redis(settings.redis_url))
    record("catalog", await asyncio.to_thread(check_catalog, settings.urza_database_url))
    artifact_dir = settings.urza_artifact_dir
    record("artifact dir", await asyncio.to_thread(check_writable, artifact_dir, "URZA_ARTIFACT_DIR"))
    return report
