"""The prefetch worker over the real bus: answers, error reasons, and it keeps serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from esper.core.logs import configure_logging
from esper.core.worker import running
from esper.karn import KarnCatalog
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, StreamConfig
from esper.security import KeyRing
from esper.tezzeret import TezzeretCompiler
from esper.urza import UrzaLibrary, UrzaRuntime
from esper.urza.prefetch import UrzaPrefetchWorker

CATALOG = KarnCatalog()
RING = KeyRing(b"prefetch-test-secret-0123456789")
READY = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY
ERROR = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR
CATALOG_UPDATE = pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE


@pytest.fixture
def library(tmp_path: Path) -> AsyncIterator[UrzaLibrary]:
    lib = UrzaLibrary(
        tmp_path / "artifacts", f"sqlite:///{tmp_path / 'catalog.db'}", registry=CollectorRegistry()
    )
    compiler = TezzeretCompiler(lib.root, catalog=CATALOG, prewarm_iterations=3)
    for bid in ("BP001", "BP009"):
        result = compiler.compile(bid, None, d=16)
        lib.save(
            CATALOG.get(bid),
            result.artifact_path,
            result.catalog_update,
            prewarm_samples=result.prewarm_samples_ms,
        )
    yield lib
    lib.close()


class Replies:
    """Collects ready and error replies seen on the bus, by request id."""

    def __init__(self) -> None:
        self.by_id: dict[str, pb.KernelArtifactReady | pb.KernelArtifactError] = {}
        self.arrived = asyncio.Condition()

    async def on_ready(self, message: OonaMessage) -> None:
        await self._add(message.decode(pb.KernelArtifactReady))

    async def on_error(self, message: OonaMessage) -> None:
        await self._add(message.decode(pb.KernelArtifactError))

    async def _add(self, reply: pb.KernelArtifactReady | pb.KernelArtifactError) -> None:
        async with self.arrived:
            self.by_id[reply.request_id] = reply
            self.arrived.notify_all()

    async def wait_for(
        self, request_id: str, limit_s: float = 10.0
    ) -> pb.KernelArtifactReady | pb.KernelArtifactError:
        async def present() -> pb.KernelArtifactReady | pb.KernelArtifactError:
            async with self.arrived:
                await self.arrived.wait_for(lambda: request_id in self.by_id)
                return self.by_id[request_id]

        return await asyncio.wait_for(present(), limit_s)


@pytest.fixture
async def bus(
    redis_url: str, library: UrzaLibrary
) -> AsyncIterator[tuple[OonaClient, UrzaPrefetchWorker, Replies]]:
    worker_client = OonaClient(redis_url, StreamConfig(instance="urza-1", block_ms=200), RING)
    peer = OonaClient(redis_url, StreamConfig(instance="trainer-1", block_ms=200), RING)
    worker = UrzaPrefetchWorker(worker_client, library, registry=CollectorRegistry())
    replies = Replies()
    ready = peer.broadcast(
        "oona.kernels.ready", replies.on_ready, types={READY}, ignore_types={CATALOG_UPDATE}
    )
    errors = peer.broadcast("oona.kernels.errors", replies.on_error, types={ERROR})
    async with running(worker.run, "prefetch"), running(ready.run, "ready"), running(errors.run, "errors"):
        yield peer, worker, replies
    await worker_client.aclose()
    await peer.aclose()


def _request(request_id: str, blueprint_id: str) -> pb.KernelPrefetchRequest:
    request = pb.KernelPrefetchRequest(
        request_id=request_id, blueprint_id=blueprint_id, training_run_id="run"
    )
    request.issued_at.GetCurrentTime()
    return request


async def test_ready_reply_loads_a_verified_kernel(
    bus: tuple[OonaClient, UrzaPrefetchWorker, Replies], library: UrzaLibrary
) -> None:
    peer, worker, replies = bus
    assert (await peer.publish_kernel_prefetch_request(_request("r-1", "BP009"))).ok
    reply = await replies.wait_for("r-1")
    assert isinstance(reply, pb.KernelArtifactReady)
    record = library.get("BP009")
    assert record is not None
    assert reply.blueprint_id == "BP009"
    assert reply.artifact_ref == record.artifact_ref
    assert reply.artifact_ref.startswith("urza://")
    assert reply.checksum == record.checksum
    assert reply.guard_digest == record.guard_digest
    assert 0 < reply.prewarm_p50_ms <= reply.prewarm_p95_ms
    module, _ms = await UrzaRuntime(library).aload_verified(
        reply.artifact_ref, reply.checksum, reply.guard_digest
    )
    import torch

    out = module(torch.randn(3, 16))
    out.sum().backward()
    assert out.shape == (3, 16)
    assert worker.metrics_snapshot()["prefetch.ready"] == 1


@pytest.mark.parametrize(
    ("request_id", "blueprint_id", "reason"),
    [
        ("r-unknown", "BP999", "missing_artifact"),
        ("r-not-forged", "BP002", "missing_artifact"),
        ("r-empty-bp", "", "missing_blueprint_id"),
    ],
)
async def test_bad_requests_get_error_replies(
    bus: tuple[OonaClient, UrzaPrefetchWorker, Replies], request_id: str, blueprint_id: str, reason: str
) -> None:
    peer, worker, replies = bus
    assert (await peer.publish_kernel_prefetch_request(_request(request_id, blueprint_id))).ok
    reply = await replies.wait_for(request_id)
    assert isinstance(reply, pb.KernelArtifactError)
    assert reply.reason == reason
    assert worker.metrics_snapshot()[f"prefetch.{reason}"] == 1


async def test_empty_request_id_is_answered_and_counted(
    bus: tuple[OonaClient, UrzaPrefetchWorker, Replies],
) -> None:
    peer, worker, replies = bus
    assert (await peer.publish_kernel_prefetch_request(_request("", "BP009"))).ok
    reply = await replies.wait_for("")
    assert isinstance(reply, pb.KernelArtifactError)
    assert reply.reason == "missing_request_id"
    assert worker.metrics_snapshot()["prefetch.missing_request_id"] == 1


async def test_corrupt_vanished_and_truncated_artifacts_keep_the_worker_serving(
    bus: tuple[OonaClient, UrzaPrefetchWorker, Replies], library: UrzaLibrary
) -> None:
    peer, worker, replies = bus
    # A good answer first, so the tampering below happens to a recently verified file.
    await peer.publish_kernel_prefetch_request(_request("r-pre", "BP009"))
    assert isinstance(await replies.wait_for("r-pre"), pb.KernelArtifactReady)
    record = library.get("BP009")
    assert record is not None
    path = library.resolve_ref(record.artifact_ref)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(blob))
    await peer.publish_kernel_prefetch_request(_request("r-flip", "BP009"))
    assert (await replies.wait_for("r-flip")).reason == "checksum_mismatch"  # type: ignore[union-attr]

    path.write_bytes(bytes(blob[:100]))  # truncated
    await peer.publish_kernel_prefetch_request(_request("r-trunc", "BP009"))
    assert (await replies.wait_for("r-trunc")).reason == "checksum_mismatch"  # type: ignore[union-attr]

    path.unlink()  # the row's file vanished
    await peer.publish_kernel_prefetch_request(_request("r-gone", "BP009"))
    assert (await replies.wait_for("r-gone")).reason == "artifact_not_found"  # type: ignore[union-attr]

    # Still serving good requests afterwards.
    await peer.publish_kernel_prefetch_request(_request("r-good", "BP001"))
    assert isinstance(await replies.wait_for("r-good"), pb.KernelArtifactReady)
    snapshot = worker.metrics_snapshot()
    assert snapshot["prefetch.checksum_mismatch"] == 2
    assert snapshot["prefetch.artifact_not_found"] == 1
    assert snapshot["prefetch.ready"] == 2


async def test_unchanged_file_is_not_hashed_again(
    bus: tuple[OonaClient, UrzaPrefetchWorker, Replies], library: UrzaLibrary
) -> None:
    peer, _worker, replies = bus
    before = library.metrics_snapshot()
    for i in range(5):
        await peer.publish_kernel_prefetch_request(_request(f"r-{i}", "BP009"))
        await replies.wait_for(f"r-{i}")
    after = library.metrics_snapshot()
    hashes = {k: after[k] - before.get(k, 0) for k in after if "hash" in k}
    assert hashes, after
    assert max(hashes.values()) <= 1


async def test_v1_peer_request_without_envelope_attributes_is_answered(
    bus: tuple[OonaClient, UrzaPrefetchWorker, Replies], redis_url: str
) -> None:
    import redis.asyncio as aioredis

    _peer, _worker, replies = bus
    envelope = pb.BusEnvelope(
        message_type=pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST,
        payload=_request("r-v1", "BP009").SerializeToString(),
    )
    payload = envelope.SerializeToString()
    raw = aioredis.Redis.from_url(redis_url)
    await raw.xadd("oona.kernels.requests", {"payload": payload, "signature": RING.sign(payload)})
    await raw.aclose()
    reply = await replies.wait_for("r-v1")
    assert isinstance(reply, pb.KernelArtifactReady)


async def test_a_huge_hostile_request_id_is_logged_short_and_on_one_line(
    bus: tuple[OonaClient, UrzaPrefetchWorker, Replies], capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    peer, _worker, replies = bus
    request_id = 'evil\n{"event": "forged"}' + "x" * 500_000
    assert (await peer.publish_kernel_prefetch_request(_request(request_id, "BP999\x1b[2J"))).ok
    reply = await replies.wait_for(request_id)
    assert reply.reason == "missing_artifact"  # type: ignore[union-attr]
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    logged = next(line for line in lines if line["event"] == "urza.prefetch_error")
    assert logged["request_id"].startswith("evil\\x0a{")
    assert logged["request_id"].endswith(f"...[{len(request_id)} chars]")
    assert len(logged["request_id"]) < 200
    assert logged["blueprint_id"] == "BP999\\x1b[2J"
    assert not any(line["event"] == "forged" for line in lines)
