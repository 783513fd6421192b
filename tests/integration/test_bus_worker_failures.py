"""Failure handling of the bus workers: refused publishes, restarts, retried states."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from _loop_support import (
    LIMIT_S,
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
from esper.oona import OonaClient, PublishResult
from esper.security import KeyRing
from esper.tamiyo import TamiyoController, TamiyoPolicyRegistry, TamiyoService
from esper.urza import UrzaLibrary, UrzaRuntime
from esper.urza.prefetch import UrzaPrefetchWorker

L = leyline_pb2


class RefusingClient(OonaClient):
    """A real client that refuses the first ``refusals`` publishes of one kind with ``reason``."""

    def __init__(self, *args: Any, refuse: str, refusals: int, reason: str = "backpressure") -> None:
        super().__init__(*args)
        self.refuse = refuse
        self.refusals = refusals
        self.reason = reason

    async def publish(self, stream: str, message_type: Any, message: Any) -> PublishResult:
        if message_type == getattr(L, self.refuse) and self.refusals > 0:
            self.refusals -= 1
            return PublishResult(False, stream, reason=self.reason)
        return await super().publish(stream, message_type, message)


def refusing(template: OonaClient, refuse: str, refusals: int) -> RefusingClient:
    return RefusingClient(template.redis, template.config, template.keyring, refuse=refuse, refusals=refusals)


async def test_refused_prefetch_publish_fails_the_request_at_once(
    make_client: Callable[..., OonaClient], libraries: Callable[[], UrzaLibrary], keyring: KeyRing
) -> None:
    manager = make_manager(libraries(), host_model("seed-1"), keyring)
    client = refusing(make_client("training"), "BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST", 1)
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
        await asyncio.wait_for(coordinator.ready.wait(), LIMIT_S)
        assert (await manager.handle_command(germinate_command(keyring, "seed-1"))).applied
    assert not coordinator.ready.is_set()
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


async def test_refused_command_publish_retries_the_state_without_re_deciding(
    make_client: Callable[..., OonaClient],
    keyring: KeyRing,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    evaluated: list[str] = []

    class CountingController(TamiyoController):
        def evaluate(self, state: L.SystemStatePacket) -> Any:
            evaluated.append(state.packet_id)
            return super().evaluate(state)

    controller = CountingController(
        keyring, KarnCatalog(), registry=TamiyoPolicyRegistry(germinate_policy(), policy_dir=tmp_path)
    )
    client = refusing(make_client("tamiyo"), "BUS_MESSAGE_TYPE_ADAPTATION_COMMAND", 2)
    service = TamiyoService(client, controller)
    state = system_state(RUN, 1, 1.0)
    async with running(service):
        assert (await make_client("trainer").publish_state(state)).ok
        fields = await read_stream(
            redis_client, "oona.normal", lambda f: decoded(f)[0] == L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
        )
    command = L.AdaptationCommand()
    command.ParseFromString(decoded(fields)[1])
    assert command.seed_operation.blueprint_id == "BP009"
    assert evaluated == [state.packet_id]  # decided once, published on the third attempt
    assert service.count("commands_published") == 1
    assert service.count("command_publish_failed.backpressure") == 2
    assert service.count("states_republished") == 2
    assert client.metrics_snapshot()["retries.oona.normal"] == 2
    assert np.array_equal(
        controller.policy.weights["action_head.bias"], germinate_policy().weights["action_head.bias"]
    )
