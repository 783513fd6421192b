"""The control plane on a 3-master Redis Cluster: prefetch, telemetry, dead letters, housekeeping."""

from __future__ import annotations

import asyncio
from pathlib import Path

from _support import LIMIT_S, Trainer, forge, readyz, serving, settings_for
from redis.asyncio.cluster import ClusterNode, RedisCluster

from esper.leyline import leyline_pb2 as L


def raw_cluster(url: str) -> RedisCluster:
    nodes = [ClusterNode(h, int(p)) for h, p in (a.rsplit(":", 1) for a in url.split("://")[1].split(","))]
    return RedisCluster(startup_nodes=nodes)


async def test_prefetch_telemetry_and_dead_letters_on_a_cluster(tmp_path: Path, cluster_url: str) -> None:
    forge(tmp_path)
    settings = settings_for(tmp_path, cluster_url)
    raw = raw_cluster(cluster_url)
    try:
        async with serving(settings) as service, Trainer(settings).listening() as trainer:
            assert await readyz(service) == 200
            assert await trainer.ask("on-a-cluster") == "ready"
            # Every bus key carries the hash tag, so the multi-key commit script stays in one slot.
            assert await raw.exists("{esper}oona.kernels.requests")
            assert not await raw.exists("oona.kernels.requests")
            # A hostile entry straight into the stream is dead-lettered with its reason.
            await raw.xadd("{esper}oona.kernels.requests", {"payload": b"\x00forged"})
            async with asyncio.timeout(LIMIT_S):
                while True:
                    letters = await raw.xrange("{esper}oona.deadletter")
                    if letters:
                        break
                    await asyncio.sleep(0.05)  # no event for a dead letter on another node's stream
            assert letters[0][1][b"reason"] == b"unsigned"
            assert letters[0][1][b"group"] == b"urza-prefetch"
            # The service's telemetry flows on the tagged telemetry stream.
            reply = await raw.xread({"{esper}oona.telemetry": "0-0"}, count=10, block=int(LIMIT_S * 1000))
            kinds = {L.BusEnvelope.FromString(f[b"payload"]).message_type for _s, es in reply for _i, f in es}
            assert L.BUS_MESSAGE_TYPE_TELEMETRY in kinds
            # Housekeeping works on the cluster (it would count a skip on any Redis error).
            await service.housekeeping()
            assert service.housekeeping_skipped == 0
            assert service.instance == "weatherlight-0"
            assert await raw.hget("{esper}oona:instances:weatherlight", "0")
    finally:
        await raw.aclose()
