"""Secrets from the outside: the shared .env, and URL passwords in every place a process shows text.

Everything here is a real process: ``esper-config``, ``esper-weatherlight-service --check`` and a
booted service, against a real password-protected Redis-protocol server (killed with SIGKILL to
make the service report failures) and the real catalogue database.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from _environment import esper_free_env
from _service import LIMIT_S, Service, run
from dotenv import dotenv_values

from esper.core.redis_server import RedisServer, ServerOptions, embedded_url
from esper.leyline import leyline_pb2 as L
from esper.oona.envelope import signed_fields
from esper.security import KeyRing

REQUESTS = "oona.kernels.requests"
ERRORS = "oona.kernels.errors"


def _prefetch_entry(keyring: KeyRing, request_id: str) -> dict[bytes, bytes]:
    request = L.KernelPrefetchRequest(request_id=request_id, blueprint_id="BP404", training_run_id="run")
    envelope = L.BusEnvelope(
        message_type=L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST, payload=request.SerializeToString()
    )
    envelope.attributes.update(
        {
            "issued_at_ms": str(time.time_ns() // 1_000_000),
            "nonce": uuid.uuid4().hex,
            "source": "test-trainer",
        }
    )
    return signed_fields(keyring, envelope.SerializeToString(deterministic=True))


def _entries(client: redis.Redis, stream: str, what: str) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of ``stream``, waiting for new ones with blocking reads, for at most ``LIMIT_S``."""
    last, deadline = "0", time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        for _stream, items in client.xread({stream: last}, block=1000) or []:
            for entry_id, fields in items:
                last = entry_id.decode()
                yield entry_id, fields
    raise AssertionError(f"{what} not on {stream} within {LIMIT_S}s")


def _answered(client: redis.Redis, request_id: str) -> str:
    """Block on the reply stream until the error reply for ``request_id`` arrives; its reason."""
    for _entry_id, fields in _entries(client, ERRORS, f"the reply to {request_id}"):
        envelope = L.BusEnvelope.FromString(fields[b"payload"])
        error = L.KernelArtifactError.FromString(envelope.payload)
        if error.request_id == request_id:
            return error.reason
    raise AssertionError("unreachable")


def _dead_letter_reason(client: redis.Redis, source_id: bytes) -> str:
    """Block on the dead-letter stream until the entry ``source_id`` is there; its reason."""
    for _entry_id, fields in _entries(client, "oona.deadletter", "the forged entry's dead letter"):
        if source_id in fields.values():
            return fields[b"reason"].decode()
    raise AssertionError("unreachable")


def test_init_then_the_service_signs_with_the_env_secret_and_no_secret_in_the_environment(
    tmp_path: Path,
) -> None:
    env = esper_free_env(WEATHERLIGHT_TELEMETRY_INTERVAL_S="0.5")
    assert "ESPER_LEYLINE_SECRET" not in env
    init = run("esper-config", "init", env=env, cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    secret = str(dotenv_values(tmp_path / ".env")["ESPER_LEYLINE_SECRET"])

    check = run(
        "esper-weatherlight-service", "--check", env={**env, "WEATHERLIGHT_HTTP_PORT": "0"}, cwd=tmp_path
    )
    assert check.returncode == 0, check.stderr
    assert "configuration and preflight OK" in check.stdout

    service = Service(env, tmp_path)
    try:
        service.wait_booted()
        assert service.get("/readyz")[0] == 200
        client = redis.Redis.from_url(embedded_url(tmp_path / "var"))
        try:
            # Signed with the secret from .env: accepted and answered (an unknown blueprint).
            client.xadd(REQUESTS, _prefetch_entry(KeyRing(secret.encode()), "shared-secret"))  # type: ignore[arg-type]
            assert _answered(client, "shared-secret") == "missing_artifact"
            # Signed with any other secret: refused, so the check above means something.
            forged_id = client.xadd(REQUESTS, _prefetch_entry(KeyRing(secrets.token_bytes(32)), "forged"))  # type: ignore[arg-type]
            assert _dead_letter_reason(client, forged_id) in ("bad_signature", "unknown_key")
        finally:
            client.close()
    finally:
        code = service.stop()
    assert code == 0, service.output
    assert secret not in service.output + check.stdout + check.stderr + init.stdout


# ------------------------------------------------------------------ URL passwords


@pytest.fixture
def protected_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    password = "redis-pw-" + secrets.token_hex(8)
    server = RedisServer(ServerOptions(data_dir=tmp_path / "redis", password=password))
    server.start()
    try:
        yield server, password
    finally:
        server.stop()


def _catalog(database_url: str) -> tuple[str, str]:
    """A catalogue URL with a password in it, and that password.

    PostgreSQL (when configured) gets a password it does not check (the test server trusts local
    connections), so the URL the service really uses carries one; SQLite URLs cannot, so the
    password then only travels in the unused Pushgateway URL.
    """
    password = "db-pw-" + secrets.token_hex(8)
    if database_url.startswith("postgresql"):
        scheme, rest = database_url.split("://", 1)
        user, host = rest.split("@", 1)
        return f"{scheme}://{user}:{password}@{host}", password
    return database_url, password


def test_url_passwords_are_masked_in_every_output_path(
    tmp_path: Path, protected_redis: tuple[RedisServer, str], database_url: str
) -> None:
    server, redis_pw = protected_redis
    catalog_url, db_pw = _catalog(database_url)
    hidden = (redis_pw, db_pw)
    env = esper_free_env(
        ESPER_LEYLINE_SECRET=secrets.token_hex(32),
        REDIS_URL=server.url,
        URZA_DATABASE_URL=catalog_url,
        URZA_ARTIFACT_DIR=str(tmp_path / "artifacts"),
        ESPER_VAR_DIR=str(tmp_path / "var"),
        PROMETHEUS_PUSHGATEWAY=f"http://push:{db_pw}@gateway:9091",
    )
    masked_redis = f"redis://:***@127.0.0.1:{server.port}/0"
    seen: list[str] = []

    # esper-config: the resolved settings.
    shown = run("esper-config", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["REDIS_URL"] == masked_redis
    assert view["PROMETHEUS_PUSHGATEWAY"] == "http://push:***@gateway:9091"
    seen.append(shown.stdout + shown.stderr)

    # --check: the settings line, console and JSON.
    for fmt in ("console", "json"):
        check = run(
            "esper-weatherlight-service",
            "--check",
            env={**env, "ESP_LOG_FORMAT": fmt, "WEATHERLIGHT_HTTP_PORT": "0"},
            cwd=tmp_path,
        )
        assert check.returncode == 0, check.stderr
        assert masked_redis in check.stderr, check.stderr
        seen.append(check.stdout + check.stderr)

    # --check that fails: preflight errors name both stores, masked.
    unreachable = {
        **env,
        "REDIS_URL": f"redis://:{redis_pw}@127.0.0.1:1/0",
        "URZA_DATABASE_URL": f"postgresql://u:{db_pw}@127.0.0.1:1/db",
        "WEATHERLIGHT_HTTP_PORT": "0",
    }
    failed = run("esper-weatherlight-service", "--check", env=unreachable, cwd=tmp_path)
    assert failed.returncode == 2
    assert "redis://:***@127.0.0.1:1/0 is unreachable" in failed.stderr
    assert "postgresql://u:***@127.0.0.1:1/db is unreachable" in failed.stderr
    seen.append(failed.stdout + failed.stderr)

    # esper-config with a bad value next to a password: the error names the variable only.
    bad = run("esper-config", env={**env, "WEATHERLIGHT_HTTP_PORT": f"x{redis_pw}"}, cwd=tmp_path)
    assert bad.returncode == 2
    assert "WEATHERLIGHT_HTTP_PORT" in bad.stderr
    seen.append(bad.stdout + bad.stderr)

    # A booted service: its log lines and status pages, then again after its Redis is killed.
    service = Service(env, tmp_path)
    try:
        settings_line = service.wait_for(lambda e: e.get("event") == "settings", "the settings line")
        assert settings_line["REDIS_URL"] == masked_redis
        service.wait_booted()
        for path in ("/status", "/readyz?verbose", "/metrics"):
            seen.append(service.get(path)[1])
        assert json.loads(service.get("/status")[1])["redis"] == "external"
        server.kill()  # SIGKILL: the service now fails to reach it and says so
        service.wait_for(lambda e: e.get("level") in ("warning", "error"), "a complaint about the bus")
        code, body = service.get("/readyz?verbose")
        assert code == 503, body
        seen.extend([body, service.get("/status")[1]])
    finally:
        service.stop()
    seen.append(service.output)

    everything = "\n".join(seen)
    for password in hidden:
        assert password not in everything
    assert masked_redis in service.output
