"""The probe/metrics/status HTTP server over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from esper.core.http_server import HealthServer
from esper.core.settings import EsperSettings
from esper.core.worker import running


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await request(port, f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    registry = CollectorRegistry()
    Counter("esper_test_requests", "test counter", registry=registry).inc(3)
    state = {"healthy": True, "workers": [{"name": "oona", "status": "running"}]}
    async with HealthServer("127.0.0.1", 0, registry=registry, status=lambda: state) as srv:
        yield srv


async def test_livez_and_bound_port(server: HealthServer) -> None:
    assert server.port != 0
    status, headers, body = await get(server.port, "/livez")
    assert status == 200
    assert body == b"ok\n"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)


async def test_readyz_flips_with_its_checks(server: HealthServer) -> None:
    redis_up = False

    async def redis_check() -> tuple[bool, str]:
        return redis_up, "ok" if redis_up else "connection refused"

    async def boot_check() -> tuple[bool, str]:
        return True, "booted"

    server.add_check("redis", redis_check)
    server.add_check("boot", boot_check)
    status, _, body = await get(server.port, "/readyz")
    assert status == 503
    status, _, body = await get(server.port, "/readyz?verbose")
    assert status == 503
    lines = body.decode().splitlines()
    assert "[-]redis failed: connection refused" in lines
    assert "[+]boot ok" in lines
    assert lines[-1] == "readyz check failed"
    redis_up = True
    status, _, body = await get(server.port, "/readyz?verbose=1")
    assert status == 200
    assert body.decode().splitlines() == ["[+]redis ok", "[+]boot ok", "readyz check passed"]


async def test_readyz_check_that_hangs_or_raises_is_not_ready(server: HealthServer) -> None:
    async def hangs() -> tuple[bool, str]:
        await asyncio.Event().wait()
        return True, ""

    async def raises() -> tuple[bool, str]:
        raise ConnectionRefusedError("catalog down")

    server.add_check("slow", hangs, timeout_s=0.05)
    server.add_check("catalog", raises)
    status, _, body = await get(server.port, "/readyz?verbose")
    assert status == 503
    text = body.decode()
    assert "[-]slow failed: timed out after 0.05s" in text
    assert "[-]catalog failed: ConnectionRefusedError: catalog down" in text
    with pytest.raises(ValueError, match="duplicate"):
        server.add_check("slow", hangs)


async def test_metrics_are_prometheus_text(server: HealthServer) -> None:
    status, headers, body = await get(server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"# TYPE esper_test_requests_total counter" in body
    assert b"esper_test_requests_total 3.0" in body


async def test_status_is_json(server: HealthServer) -> None:
    status, headers, body = await get(server.port, "/status")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["workers"][0]["name"] == "oona"


async def test_status_masks_url_passwords_wherever_they_sit() -> None:
    class Failure:
        def __str__(self) -> str:
            return "lost redis://:hunter2@10.0.0.5:6379/0"

    state = {"error": Failure(), "nested": [{"url": "postgresql://u:hunter3@db/e?password=hunter4"}]}
    async with HealthServer("127.0.0.1", 0, registry=CollectorRegistry(), status=lambda: state) as srv:
        status, _headers, body = await get(srv.port, "/status")
    assert status == 200
    assert b"hunter" not in body
    shown = json.loads(body)
    assert shown["error"] == "lost redis://:***@10.0.0.5:6379/0"
    assert shown["nested"][0]["url"] == "postgresql://u:***@db/e?password=***"


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"GET /livez\r\n\r\n",
        b"GET livez HTTP/1.1\r\n\r\n",
        b"\xff\xfe /x HTTP/1.1\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nHost: truncated",  # then EOF
    ],
)
async def test_malformed_requests_get_400_and_server_keeps_serving(server: HealthServer, raw: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(raw)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert data.startswith(b"HTTP/1.1 400 ")
    status, _, _ = await get(server.port, "/livez")
    assert status == 200


async def test_unknown_path_method_and_head(server: HealthServer) -> None:
    assert (await get(server.port, "/nope"))[0] == 404
    status, _, _ = await request(server.port, b"POST /livez HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 405
    status, headers, body = await request(server.port, b"HEAD /livez HTTP/1.1\r\n\r\n")
    assert status == 200
    assert body == b""
    assert headers["content-length"] == "3"


async def test_idle_connection_times_out_with_400_and_stop_closes_open_ones() -> None:
    srv = HealthServer("127.0.0.1", 0, registry=CollectorRegistry(), read_timeout_s=0.1)
    await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"GET /livez HTTP/1.1\r\n")  # never finishes its headers
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 400 ")
    writer.close()
    await writer.wait_closed()
    port = srv.port
    idle_reader, idle = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.01)
    await asyncio.wait_for(srv.stop(), 5)  # an idle client does not hold up stop()
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # the server closed it
    idle.close()
    await idle.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_from_settings_binds_configured_host() -> None:
    settings = EsperSettings(weatherlight_http_host="127.0.0.1", weatherlight_http_port=0)
    srv = HealthServer.from_settings(settings, registry=CollectorRegistry())
    async with running(srv.run, "http") as ctx:  # entered once the port is bound (ctx.started)
        assert ctx.is_started
        port = srv.port
        assert port != 0
        assert (await get(port, "/livez"))[0] == 200
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_provider_reports_several_paths_and_its_failure_under_its_name(server: HealthServer) -> None:
    async def paths() -> list[tuple[str, bool, str]]:
        return [("redis", True, "ok"), ("bus", False, "breaker open at redis://:hunter2@h:1/0")]

    async def broken() -> list[tuple[str, bool, str]]:
        raise RuntimeError("probe crashed")

    server.add_checks("health", paths)
    status, _, body = await get(server.port, "/readyz?verbose")
    assert status == 503
    assert "[+]redis ok" in body.decode()
    assert "[-]bus failed: breaker open at redis://:***@h:1/0" in body.decode()  # never a password
    server.add_checks("more", broken)
    assert (
        "[-]more failed: RuntimeError: probe crashed"
        in (await get(server.port, "/readyz?verbose"))[2].decode()
    )
