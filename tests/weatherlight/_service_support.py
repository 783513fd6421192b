"""Running the composed service in-process and watching it through its probes and the bus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from esper.core.settings import EsperSettings
from esper.leyline import leyline_pb2 as L
from esper.oona.envelope import signed_fields
from esper.security import KeyRing
from esper.weatherlight.service import WeatherlightService

REQUESTS = "oona.kernels.requests"
SECRET = "test-secret-for-esper-lite-0123456789"
LIMIT_S = 20.0  # generous: the machine may be shared; every wait ends as soon as its condition holds


def make_settings(tmp_path: Path, redis_url: str, **overrides: Any) -> EsperSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "urza_database_url": f"sqlite:///{tmp_path}/c.db",
        "urza_artifact_dir": tmp_path / "artifacts",
        "var_dir": tmp_path / "var",
        "weatherlight_http_port": 0,
        "weatherlight_telemetry_interval_s": 0.2,
        "leyline_secret": SECRET,
    }
    values.update(overrides)
    return EsperSettings(**values)


async def http_get(port: int, path: str, *, timeout_s: float = 5.0) -> tuple[int, str]:
    """One GET against a probe server (the service's or Nissa's): (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5.0)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the server closed first; nothing left to flush
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def status_of(service: WeatherlightService) -> dict[str, Any]:
    code, body = await http_get(service.http.port, "/status")
    assert code == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def worker_view(status: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(w for w in status["workers"] if w["name"] == name)
    return found


async def eventually(
    probe: Callable[[], Awaitable[bool]], what: str, limit_s: float = LIMIT_S, every_s: float = 0.02
) -> None:
    """Poll ``probe`` (a real condition, e.g. an HTTP probe) until true, at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not await probe():
        assert time.monotonic() < deadline, f"timed out after {limit_s}s waiting for {what}"
        await asyncio.sleep(every_s)


@asynccontextmanager
async def serving(service: WeatherlightService) -> AsyncIterator[WeatherlightService]:
    """Boot the service; stop it afterwards unless the test already did."""
    await asyncio.wait_for(service.start(), 30.0)
    try:
        yield service
    finally:
        if service.supervisor.result is None:
            await service.stop()


def metric(prom_text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0.0 when absent)."""
    for family in text_string_to_metric_families(prom_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def weatherlight_packets(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[L.TelemetryPacket]:
    packets = []
    for _eid, fields in entries:
        envelope = L.BusEnvelope()
        envelope.ParseFromString(fields[b"payload"])
        if envelope.message_type != L.BUS_MESSAGE_TYPE_TELEMETRY:
            continue
        packet = L.TelemetryPacket()
        packet.ParseFromString(envelope.payload)
        if packet.source_subsystem == "weatherlight":
            packets.append(packet)
    return packets


async def read_new(
    redis: aioredis.Redis, stream: str, last: str, block_ms: int = 500
) -> tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]:
    """Blocking XREAD after ``last``: (new last id, entries)."""
    reply = await redis.xread({stream: last}, block=block_ms)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    for _stream, items in reply or []:
        for entry_id, fields in items:
            entries.append((entry_id, fields))
            last = entry_id.decode()
    return last, entries


async def reply_ids(redis: aioredis.Redis) -> list[str]:
    """The request ids of every kernel reply (ready and error) on the bus so far."""
    ids = []
    for stream, kind in (
        ("oona.kernels.ready", L.KernelArtifactReady),
        ("oona.kernels.errors", L.KernelArtifactError),
    ):
        for _eid, fields in await redis.xrange(stream):
            envelope = L.BusEnvelope()
            envelope.ParseFromString(fields[b"payload"])
            message = kind()
            message.ParseFromString(envelope.payload)
            ids.append(message.request_id)
    return ids


def prefetch_entry(keyring: KeyRing, request_id: str, *, issued_at_ms: int) -> dict[bytes, bytes]:
    """A correctly signed KernelPrefetchRequest entry with a chosen ``issued_at_ms``."""
    request = L.KernelPrefetchRequest(request_id=request_id, blueprint_id="BP404", training_run_id="run-x")
    envelope = L.BusEnvelope(
        message_type=L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST, payload=request.SerializeToString()
    )
    envelope.attributes.update(
        {"issued_at_ms": str(issued_at_ms), "nonce": uuid.uuid4().hex, "source": "test-trainer"}
    )
    return signed_fields(keyring, envelope.SerializeToString(deterministic=True))
