"""Failure handling of the bus workers: refused publishes, restarts, retried states."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from _loop_support import (
    RUN,
    ObservedCoordinator,
    decoded,
    events,
    germinate_command,
    germinate_policy,
    host_model,
    make_manager,
    read_stream,
    running,
    system_state,
)

from esper.karn import KarnCatalog
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.security import KeyRing
from esper.tamiyo import TamiyoController, TamiyoPolicyRegistry, TamiyoService
from esper.urza import UrzaLibrary, UrzaRuntime
from esper.urza.prefetch import UrzaPrefetchWorker

L = leyline_pb2


async def test_refused_prefetch_publish_fails_the_request_at_once(
    make_client: Callable[..., OonaClient], libraries: Callable[[], UrzaLibrary], keyring: KeyRing
) -> None:
    manager = make_manager(libraries(), host_model("seed-1"), keyring)
    # A real refusal: backpressure at a depth the stream always has.
    client = make_client("training", backpressure={"oona.kernels.requests": 0})
    coordinator = ObservedCoordinator(client, manager, UrzaRuntime(libraries()), training_run_id=RUN)
    assert (await manager.handle_command(germinate_command(keyring, "seed-1"))).applied
    seed = manager.get_seed("seed-1")
    assert seed is not None
    assert seed.kernel_source == "fallback"
    assert "publish_backpressure" in seed.fallback_reason
    assert coordinator.count("publish_failed.backpressure") == 1
    assert coordinator.outstanding == {}
    assert [e["reason"] for e in events(manager, "kernel_failed")] == ["publish_backpressure"]


async def test_coordinator_restart_resumes_after_the_last_reply_seen(
    make_client: Callable[..., OonaClient], libraries: Callable[[], UrzaLibrary], keyring: KeyRing
) -> None:
    manager = make_manager(libraries(), host_model("seed-1"), keyring)
    coordinator = ObservedCoordinator(
        make_client("training"), manager, UrzaRuntime(libraries()), training_run_id=RUN, expire_interval_s=0.1
    )
    worker = UrzaPrefetchWorker(make_client("urza"), libraries())
    async with running(coordinator):
        assert (await manager.handle_command(germinate_command(keyring, "seed-1"))).applied
    # The reply is produced while the coordinator is down ...
    async with running(worker):
        await read_stream(
            worker.client.redis,
            "oona.kernels.ready",
            lambda f: decoded(f)[0] == L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY,
        )
    # ... and handled once it is back.
    seed = manager.get_seed("seed-1")
    assert seed is not None
    assert seed.kernel is None
    async with running(coordinator):
        await coordinator.until(lambda: seed.kernel is not None)
    assert seed.kernel_source == "bus"
    assert coordinator.count("attached") == 1


async def test_refused_commit_is_retried_without_re_deciding(
    make_client: Callable[..., OonaClient],
    keyring: KeyRing,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    """The server refuses the commit (a reply stream's key holds a string): the state stays pending,
    is not evaluated again, and its command is published exactly once after the key is fixed."""
    evaluated: list[str] = []

    class CountingController(TamiyoController):
        def evaluate(self, state: L.SystemStatePacket, run: Any = None) -> Any:
            evaluated.append(state.packet_id)
            return super().evaluate(state, run)

    controller = CountingController(
        keyring, KarnCatalog(), registry=TamiyoPolicyRegistry(germinate_policy(), policy_dir=tmp_path)
    )
    client = make_client("tamiyo")
    service = TamiyoService(client, controller)
    state = system_state(RUN, 1, 1.0)
    await redis_client.set("oona.telemetry", "not a stream")  # the decision's telemetry cannot be written
    async with running(service):
        assert (await make_client("trainer").publish_state(state)).ok
        problems = await client.link.health.wait_until(lambda found: any("cannot commit" in p for p in found))
        assert any("WRONGTYPE" in p for p in problems)
        await redis_client.delete("oona.telemetry")
        fields = await read_stream(
            redis_client, "oona.normal", lambda f: decoded(f)[0] == L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
        )
        await client.link.health.wait_until(lambda found: not found)
    entries = await redis_client.xrange("oona.normal")
    commands = [f for _id, f in entries if decoded(f)[0] == L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND]
    command = L.AdaptationCommand()
    command.ParseFromString(decoded(fields)[1])
    assert command.seed_operation.blueprint_id == "BP009"
    assert evaluated == [state.packet_id]  # decided once, committed once the server took writes again
    assert len(commands) == 1
    assert client.metrics_snapshot()["commit_failed.oona.normal"] >= 1
    assert np.array_equal(
        controller.policy.weights["action_head.bias"], germinate_policy().weights["action_head.bias"]
    )
