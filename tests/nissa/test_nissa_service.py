"""Nissa as a service: real Redis, real Oona publishers, real HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from _environment import esper_free_env
from security._service import BIN, Service, run

from esper.core import TelemetryMetric, build_telemetry_packet, configure_logging
from esper.core.redis_server import free_port
from esper.core.worker import running
from esper.leyline import leyline_pb2
from esper.nissa import NISSA_GROUP, NissaService
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing

SECRET = b"nissa-test-secret-0123456789abcdef"
_L = leyline_pb2


class Seen:
    """Counts messages Nissa recorded; tests wait on it instead of sleeping."""

    def __init__(self) -> None:
        self.count = 0
        self.by_stream: dict[str, int] = {}
        self._changed = asyncio.Condition()

    def __call__(self, stream: str, _message_type: int) -> None:
        self.count += 1
        self.by_stream[stream] = self.by_stream.get(stream, 0) + 1
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, count: int, limit_s: float = 10.0) -> None:
        async def reached() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.count >= count)

        await asyncio.wait_for(reached(), limit_s)


@dataclass
class Running:
    service: NissaService
    publisher: OonaClient
    seen: Seen
    redis: aioredis.Redis


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def config(instance: str) -> StreamConfig:
    return StreamConfig(instance=instance, block_ms=200)


@pytest.fixture
async def nissa(redis_url: str) -> AsyncIterator[Running]:
    keys = KeyRing(SECRET)
    client = OonaClient(redis_url, config("nissa-test-1"), keys)
    publisher = OonaClient(redis_url, config("pub-1"), keys)
    service = NissaService(client, http_port=0)
    seen = Seen()
    service.add_listener(seen)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        async with running(service.run, "nissa"):
            yield Running(service, publisher, seen, raw)
    finally:
        await raw.aclose()
        await publisher.aclose()
        await client.aclose()


async def test_telemetry_becomes_labelled_series_over_http(nissa: Running) -> None:
    packet = build_telemetry_packet(
        source="weatherlight",
        metrics=[
            TelemetryMetric("weatherlight.uptime_s", 42.5),
            TelemetryMetric("oona.pending.oona-normal", 7),
        ],
    )
    assert await nissa.publisher.publish_telemetry(packet)
    await nissa.seen.wait_for(1)
    status, body = await http_get(nissa.service.port, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'esper_weatherlight_uptime_s{instance="pub-1",source="weatherlight"} 42.5' in text
    assert 'esper_oona_pending_oona_normal{instance="pub-1",source="weatherlight"} 7.0' in text
    assert 'esper_telemetry_packets_total{instance="pub-1",source="weatherlight"} 1.0' in text
    # Nissa's own consumer metrics share the registry.
    assert 'oona_consumed_total{stream="oona.telemetry"} 1.0' in text

    status, body = await http_get(nissa.service.port, "/healthz")
    health = json.loads(body)
    assert status == 200
    assert health["status"] == "ok"
    assert set(health["streams"]) == {"oona.telemetry", "oona.normal", "oona.emergency"}
    assert health["subscribed"]
    assert health["group"] == NISSA_GROUP
    assert health["handled"] == {"telemetry": 1}
    assert (await http_get(nissa.service.port, "/livez"))[0] == 200
    status, body = await http_get(nissa.service.port, "/readyz?verbose")
    assert status == 200, body


async def test_states_reports_and_commands_are_counted(nissa: Running) -> None:
    state = _L.SystemStatePacket(
        version=1, current_epoch=3, training_run_id="run-7", validation_accuracy=0.75, validation_loss=0.5
    )
    assert await nissa.publisher.publish_state(state)
    assert await nissa.publisher.publish_field_report(
        _L.FieldReport(report_id="r1", outcome=_L.FIELD_REPORT_OUTCOME_SUCCESS)
    )
    assert await nissa.publisher.publish_command(
        _L.AdaptationCommand(version=1, command_id="c1", command_type=_L.COMMAND_SEED)
    )
    await nissa.seen.wait_for(3)
    _, body = await http_get(nissa.service.port, "/metrics")
    text = body.decode()
    assert 'esper_system_state_packets_total{instance="pub-1",run="run-7"} 1.0' in text
    assert 'esper_training_validation_accuracy{instance="pub-1",run="run-7"} 0.75' in text
    assert 'esper_field_reports_total{instance="pub-1",outcome="success"} 1.0' in text
    assert 'esper_adaptation_commands_total{instance="pub-1",type="seed"} 1.0' in text


async def test_emergency_stream_is_consumed(nissa: Running) -> None:
    packet = build_telemetry_packet(source="kasmina", metrics=[TelemetryMetric("kasmina.seeds.active", 2)])
    result = await nissa.publisher.publish_telemetry(packet, priority=_L.MESSAGE_PRIORITY_CRITICAL)
    assert result.stream == "oona.emergency"
    urgent_state = _L.SystemStatePacket(version=1, training_run_id="run-e")
    assert (await nissa.publisher.publish_state(urgent_state, emergency=True)).stream == "oona.emergency"
    await nissa.seen.wait_for(2)
    assert nissa.seen.by_stream == {"oona.emergency": 2}
    _, body = await http_get(nissa.service.port, "/metrics")
    assert 'esper_kasmina_seeds_active{instance="pub-1",source="kasmina"} 2.0' in body.decode()
    assert 'esper_system_state_packets_total{instance="pub-1",run="run-e"} 1.0' in body.decode()


async def _dead_letters(redis: aioredis.Redis, count: int) -> list[dict[bytes, bytes]]:
    seen: list[dict[bytes, bytes]] = []
    last = "0-0"
    while len(seen) < count:
        reply: Any = await redis.xread({"oona.deadletter": last}, block=1000)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id.decode()
                seen.append(fields)
    return seen


async def test_garbage_is_dead_lettered_and_nissa_keeps_serving(nissa: Running) -> None:
    await nissa.redis.xadd("oona.telemetry", {b"payload": b"\x00garbage", b"signature": b"bogus"})
    letters = await asyncio.wait_for(_dead_letters(nissa.redis, 1), 10)
    assert letters[0][b"source_stream"] == b"oona.telemetry"
    assert letters[0][b"reason"] == b"bad_signature"
    # Well signed, right type, but the payload is not a TelemetryPacket: counted, acked, no crash.
    await nissa.publisher.publish(_L.BUS_MESSAGE_TYPE_TELEMETRY, b"\xff\xff\xff")
    await nissa.seen.wait_for(1)
    assert nissa.service.errors["telemetry"] == 1
    packet = build_telemetry_packet(source="tolaria", metrics=[TelemetryMetric("tolaria.training.loss", 0.5)])
    assert await nissa.publisher.publish_telemetry(packet)
    await nissa.seen.wait_for(2)
    status, body = await http_get(nissa.service.port, "/metrics")
    assert status == 200
    text = body.decode()
    assert 'esper_tolaria_training_loss{instance="pub-1",source="tolaria"} 0.5' in text
    assert 'esper_nissa_handler_errors_total{stream="oona.telemetry",type="telemetry"} 1.0' in text
    health = json.loads((await http_get(nissa.service.port, "/healthz"))[1])
    assert health["status"] == "ok"


async def test_alert_fires_after_for_count_and_clears(nissa: Running) -> None:
    async def latency(value: float) -> None:
        packet = build_telemetry_packet(
            source="tolaria", metrics=[TelemetryMetric("tolaria.training.latency_ms", value)]
        )
        assert await nissa.publisher.publish_telemetry(packet)

    for n in (1, 2):  # training_latency_high needs three consecutive breaches
        await latency(25_000)
        await nissa.seen.wait_for(n)
        assert json.loads((await http_get(nissa.service.port, "/alerts"))[1]) == []
    await latency(26_000)
    await nissa.seen.wait_for(3)
    alerts = json.loads((await http_get(nissa.service.port, "/alerts"))[1])
    assert [(a["rule"], a["source"], a["instance"], a["metric"], a["value"]) for a in alerts] == [
        ("training_latency_high", "tolaria", "pub-1", "tolaria.training.latency_ms", 26_000.0)
    ]
    _, body = await http_get(nissa.service.port, "/metrics")
    assert 'esper_nissa_alerts_fired_total{rule="training_latency_high"} 1.0' in body.decode()
    await latency(10)
    await nissa.seen.wait_for(4)
    assert json.loads((await http_get(nissa.service.port, "/alerts"))[1]) == []


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from esper.nissa.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _clean_env(tmp: str) -> dict[str, str]:
    return esper_free_env(HOME=tmp)


def test_cli_help_and_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _clean_env(str(tmp_path))
    monkeypatch.chdir(str(tmp_path))
    helped = _cli(env, "--help")
    assert helped.returncode == 0
    assert "NISSA_HTTP_PORT" in helped.stdout
    env["ESPER_LEYLINE_SECRET"] = "x" * 32
    missing = subprocess.run(
        [sys.executable, "-c", "from esper.nissa.cli import main; main()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(tmp_path),
    )
    assert missing.returncode == 2
    assert "REDIS_URL" in missing.stderr
    assert "Traceback" not in missing.stderr
    env.update(REDIS_URL="redis://127.0.0.1:1/0", NISSA_HTTP_PORT="abc")
    bad = subprocess.run(
        [sys.executable, "-c", "from esper.nissa.cli import main; main()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(tmp_path),
    )
    assert bad.returncode == 2
    assert "NISSA_HTTP_PORT" in bad.stderr


def test_cli_serves_stops_on_sigterm_and_takes_its_name_back_on_the_next_start(
    redis_url: str, tmp_path: Path
) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _clean_env(str(tmp_path))
    env.update(
        ESPER_LEYLINE_SECRET="x" * 32, REDIS_URL=redis_url, NISSA_HTTP_PORT=str(port), ESP_LOG_FORMAT="json"
    )
    names = []
    for _start in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", "from esper.nissa.cli import main; main()"],
            env=env,
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # block on the process's own log, no sleeping
                if '"oona.instance_leased"' in line:
                    names.append(json.loads(line)["instance"])
                if "nissa ready" in line:
                    break
            else:
                pytest.fail("nissa exited before becoming ready")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                assert json.loads(response.read())["status"] == "ok"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # A clean stop releases the leased name, so a restart is the same series in Prometheus.
    assert names == ["nissa-0", "nissa-0"]


def test_cli_started_beside_the_service_finds_its_embedded_server_and_secret(tmp_path: Path) -> None:
    """The README's way: `esper-config init`, the service, then Nissa from the same directory, no settings."""
    env = esper_free_env()
    assert run("esper-config", "init", env=env, cwd=tmp_path).returncode == 0
    service = Service(env, tmp_path)
    nissa: subprocess.Popen[str] | None = None
    try:
        service.wait_booted()
        nissa = subprocess.Popen(
            [str(BIN / "esper-nissa-service")],
            env={**env, "NISSA_HTTP_PORT": str(free_port()), "ESP_LOG_FORMAT": "json"},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert nissa.stdout is not None
        output = []
        for line in nissa.stdout:  # block on the process's own log, no sleeping
            output.append(line)
            if "nissa ready" in line:
                break
        else:
            pytest.fail(f"nissa exited ({nissa.wait()}) before becoming ready:\n{''.join(output)}")
        # Its consumer group is on the service's own server.
        streams = run("esper-oona", "streams", env=env, cwd=tmp_path)
        groups = {row["stream"]: row["groups"] for row in map(json.loads, streams.stdout.splitlines())}
        assert "nissa" in groups["oona.telemetry"], streams.stdout
        nissa.send_signal(signal.SIGTERM)
        rest, _ = nissa.communicate(timeout=15)
        output.append(rest)
        assert nissa.returncode == 0, "".join(output)
        password = (tmp_path / "var" / "redis" / "password").read_text().strip()
        assert password not in "".join(output)
    finally:
        if nissa is not None and nissa.poll() is None:
            nissa.kill()
            nissa.wait()
        assert service.stop() == 0, service.output


async def test_a_hostile_source_is_logged_short_and_escaped_when_its_alert_fires(
    nissa: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    source = 'tolaria\n{"event": "forged"}' + "x" * 5000
    for n in (1, 2, 3):  # training_latency_high fires on the third consecutive breach
        packet = build_telemetry_packet(
            source=source, metrics=[TelemetryMetric("tolaria.training.latency_ms", 30_000)]
        )
        assert await nissa.publisher.publish_telemetry(packet)
        await nissa.seen.wait_for(n)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert not any(line["event"] == "forged" for line in lines)
    [fired] = [line for line in lines if line["event"] == "nissa.alert_firing"]
    assert fired["source"].startswith("tolaria\\x0a{")
    assert fired["source"].endswith(f"...[{len(source)} chars]")
    assert len(fired["source"]) < 120
