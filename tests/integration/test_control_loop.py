"""The control loop end to end over a real Redis, a real SQLite Urza and real forged kernels.

Tamiyo (TamiyoService) → signed command on oona.normal → Kasmina intake →
germinate → KernelPrefetchRequest → UrzaPrefetchWorker → KernelArtifactReady →
KasminaPrefetchCoordinator verifies checksum + guard and attaches → the seed
trains, blends and changes the host's output. Plus the failure paths: forged
artifacts, lost requests, Simic policy updates (genuine and forged) and bad
commands. Waits are bounded and event-driven (queues, events, blocking XREAD).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
import torch
from _loop_support import (
    LIMIT_S,
    RUN,
    L,
    ObservedCoordinator,
    decision_telemetry_for,
    decoded,
    events,
    germinate_command,
    germinate_policy,
    host_model,
    make_manager,
    read_stream,
    running,
    system_state,
    telemetry_action,
)
from torch import nn

from esper.karn import KarnCatalog
from esper.kasmina import CommandResult, KasminaCommandIntake
from esper.oona import OonaClient
from esper.security import KeyRing
from esper.tamiyo import (
    PolicyConfig,
    TamiyoController,
    TamiyoPolicy,
    TamiyoPolicyRegistry,
    TamiyoService,
    encode_policy,
)
from esper.tamiyo.simic import publish_simic_update, train_policy_update
from esper.urza import UrzaLibrary, UrzaRuntime
from esper.urza.prefetch import UrzaPrefetchWorker


# ----------------------------------------------------------------------- tests
async def test_germinate_over_bus_attaches_verified_kernel_that_blends_in_isolation(
    make_client: Callable[..., OonaClient], libraries: Callable[[], UrzaLibrary], keyring: KeyRing
) -> None:
    model = host_model("seed-1")
    manager = make_manager(libraries(), model, keyring)
    training = make_client("training")
    coordinator = ObservedCoordinator(
        training, manager, UrzaRuntime(libraries()), training_run_id=RUN, expire_interval_s=0.1
    )
    worker = UrzaPrefetchWorker(make_client("urza"), libraries())
    # The command Tamiyo itself would send for this state.
    controller = TamiyoController(keyring, KarnCatalog(), registry=TamiyoPolicyRegistry(germinate_policy()))
    decision = controller.evaluate(system_state(RUN, 1, 1.0))
    assert decision.command is not None
    assert decision.command.command_type == L.COMMAND_SEED
    assert decision.command.target_seed_id == "seed-1"
    assert decision.command.seed_operation.blueprint_id == "BP009"

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    target = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        host_only = model(x).clone()

    async with running(worker, coordinator):
        result = await manager.handle_command(decision.command)
        assert result.applied, result
        seed = manager.get_seed("seed-1")
        assert seed is not None
        await coordinator.until(lambda: seed.kernel is not None)

    assert seed.stage == L.SEED_STAGE_TRAINING
    assert seed.kernel_source == "bus"
    assert not seed.used_fallback
    assert 0.0 < seed.latency_ms < manager.latency_budget_ms
    assert coordinator.count("attached") == 1
    assert coordinator.count("requests_sent") == 1
    assert worker.metrics_snapshot()["prefetch.ready"] == 1
    assert type(seed.kernel).__name__ == "ResidualMLP"

    slot = manager.slot_for("seed-1")
    assert slot is not None
    assert slot.kernel is seed.kernel
    host_params = list(model.parameters())
    seed_params = manager.seed_parameters("seed-1")
    assert seed_params
    assert not {id(p) for p in seed_params} & {id(p) for p in host_params}
    seed_opt = torch.optim.SGD(seed_params, lr=0.05)
    stages: list[int] = []
    alphas: list[float] = []
    checked_isolation = False
    for _ in range(14):
        model.zero_grad()
        seed_opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()  # type: ignore[no-untyped-call]
        if slot.alpha > 0.0 and not checked_isolation:
            checked_isolation = True
            assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in seed_params)
            actual = [p.grad.clone() if p.grad is not None else None for p in host_params]
            # Reference: the same blend with the seed output as a constant.
            model.zero_grad()
            h = model[1](model[0](x))
            y_host = slot.host(h)
            seed_out = slot.kernel(y_host.detach()).detach()
            blended = (1 - slot.alpha) * y_host + slot.alpha * seed_out
            nn.functional.mse_loss(model[3](blended), target).backward()  # type: ignore[no-untyped-call]
            for got, ref in zip(actual, [p.grad for p in host_params], strict=True):
                assert got is not None
                assert ref is not None
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)
        seed_opt.step()
        manager.step()
        stages.append(seed.stage)
        alphas.append(slot.alpha)

    assert checked_isolation
    assert L.SEED_STAGE_BLENDING in stages
    assert stages.index(L.SEED_STAGE_BLENDING) > stages.index(L.SEED_STAGE_TRAINING)
    blending = [a for a, s in zip(alphas, stages, strict=True) if s == L.SEED_STAGE_BLENDING]
    assert len(blending) >= 3
    assert blending == sorted(blending)
    assert blending[0] < blending[-1]
    assert seed.stage in (L.SEED_STAGE_SHADOWING, L.SEED_STAGE_PROBATIONARY)
    assert slot.alpha == 1.0
    with torch.no_grad():
        grafted = model(x)
    assert not torch.allclose(grafted, host_only, atol=1e-4)  # host weights were never stepped
    assert seed.isolation_violations == 0


async def test_tamiyo_service_command_reaches_kasmina_over_the_bus(
    make_client: Callable[..., OonaClient],
    libraries: Callable[[], UrzaLibrary],
    keyring: KeyRing,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    model = host_model("seed-1")
    manager = make_manager(libraries(), model, keyring)
    training = make_client("training")
    coordinator = ObservedCoordinator(
        training, manager, UrzaRuntime(libraries()), training_run_id=RUN, expire_interval_s=0.1
    )
    results: asyncio.Queue[tuple[L.AdaptationCommand, CommandResult]] = asyncio.Queue()
    intake = KasminaCommandIntake(training, manager, on_result=lambda c, r: results.put_nowait((c, r)))
    controller = TamiyoController(
        keyring, KarnCatalog(), registry=TamiyoPolicyRegistry(germinate_policy(), policy_dir=tmp_path / "p")
    )
    service = TamiyoService(make_client("tamiyo"), controller)
    worker = UrzaPrefetchWorker(make_client("urza"), libraries())

    async with running(worker, coordinator, intake, service):
        published = await training.publish_state(system_state(RUN, 1, 1.0, manager.export_seed_states()))
        assert published.ok
        command, result = await asyncio.wait_for(results.get(), LIMIT_S)
        assert result.applied, result
        assert command.issued_by == "tamiyo"
        assert command.command_type == L.COMMAND_SEED
        assert command.seed_operation.blueprint_id == "BP009"
        seed = manager.get_seed(command.target_seed_id)
        assert seed is not None
        await coordinator.until(lambda: seed.kernel is not None)
        assert seed.kernel_source == "bus"
        assert seed.stage == L.SEED_STAGE_TRAINING
        # The next state shows the seed grafting: Tamiyo defers, closes the previous
        # command with a field report and sends no second germination.
        await training.publish_state(system_state(RUN, 2, 0.9, manager.export_seed_states()))
        report = await read_stream(
            redis_client, "oona.normal", lambda f: decoded(f)[0] == L.BUS_MESSAGE_TYPE_FIELD_REPORT
        )
        parsed = L.FieldReport()
        parsed.ParseFromString(decoded(report)[1])
        assert parsed.command_id == command.command_id
        assert parsed.outcome == L.FIELD_REPORT_OUTCOME_SUCCESS

    snap = service.metrics_snapshot()
    assert snap["states_evaluated"] == 2
    assert snap["commands"] == 1
    assert snap["field_reports"] == 1
    assert intake.count("applied") == 1
    assert manager.accepted_commands == 1
    assert results.empty()


async def test_forged_ready_is_rejected_and_a_lost_request_falls_back(
    make_client: Callable[..., OonaClient],
    libraries: Callable[[], UrzaLibrary],
    keyring: KeyRing,
) -> None:
    library = libraries()
    model = host_model("seed-1", "seed-2", "seed-3")
    manager = make_manager(library, model, keyring, prefetch_timeout_seconds=0.3, prefetch_retries=1)
    training = make_client("training")
    coordinator = ObservedCoordinator(
        training, manager, UrzaRuntime(libraries()), training_run_id=RUN, expire_interval_s=0.05
    )
    attacker = make_client("attacker")  # holds the bus key, but not the artifact
    record = library.get("BP009")
    other = library.get("BP002")
    assert record is not None
    assert other is not None

    async with running(coordinator):  # no Urza worker: nobody answers
        for seed_id in ("seed-1", "seed-2"):
            assert (await manager.handle_command(germinate_command(keyring, seed_id))).applied
        pending = {e.seed_id: rid for rid, e in coordinator.outstanding.items()}
        assert set(pending) == {"seed-1", "seed-2"}
        # seed-1: a signed reply naming BP002's file but BP009's checksum.
        bad_checksum = L.KernelArtifactReady(
            request_id=pending["seed-1"],
            blueprint_id="BP009",
            artifact_ref=other.artifact_ref,
            checksum=record.checksum,
            guard_digest=record.guard_digest,
        )
        # seed-2: the right file and checksum, a forged guard digest.
        bad_guard = L.KernelArtifactReady(
            request_id=pending["seed-2"],
            blueprint_id="BP009",
            artifact_ref=record.artifact_ref,
            checksum=record.checksum,
            guard_digest="0" * len(record.guard_digest),
        )
        assert (await attacker.publish_kernel_artifact_ready(bad_checksum)).ok
        assert (await attacker.publish_kernel_artifact_ready(bad_guard)).ok
        # A reply for some other process's request: skipped quietly.
        assert (
            await attacker.publish_kernel_artifact_ready(L.KernelArtifactReady(request_id="elsewhere"))
        ).ok
        await coordinator.until(lambda: coordinator.count("replies_foreign") == 1)
        # A second reply to an answered request: ignored.
        assert (await attacker.publish_kernel_artifact_ready(bad_checksum)).ok
        await coordinator.until(lambda: coordinator.count("replies_duplicate") == 1)

        # seed-3: the request is lost; timeout, one retry, timeout, fallback.
        assert (await manager.handle_command(germinate_command(keyring, "seed-3"))).applied
        seed3 = manager.get_seed("seed-3")
        assert seed3 is not None
        await coordinator.until(lambda: seed3.kernel is not None, limit_s=5.0)

    assert coordinator.count("verify_failed.checksum_mismatch") == 1
    assert coordinator.count("verify_failed.guard_mismatch") == 1
    assert coordinator.count("attached") == 0
    for seed_id, reason in (("seed-1", "checksum_mismatch"), ("seed-2", "guard_mismatch")):
        seed = manager.get_seed(seed_id)
        assert seed is not None
        assert seed.kernel_source == "fallback"
        assert seed.used_fallback
        assert reason in seed.fallback_reason
        assert type(seed.kernel).__name__ != "ResidualMLP"  # BP009 never attached
    failed = {e["seed_id"]: e["reason"] for e in events(manager, "kernel_failed")}
    assert failed == {"seed-1": "checksum_mismatch", "seed-2": "guard_mismatch"}

    assert coordinator.count("requests_sent") == 2 + 2  # seed-3: first try and one retry
    timeouts = [e for e in events(manager, "prefetch_timeout") if e["seed_id"] == "seed-3"]
    assert [t["attempt"] for t in timeouts] == ["1", "2"]
    fallback = [e for e in events(manager, "fallback_applied") if e["seed_id"] == "seed-3"]
    assert fallback == [
        {"seed_id": "seed-3", "blueprint_id": "BP009", "fallback": "BP001", "reason": "prefetch_timeout"}
    ]
    assert seed3.kernel_source == "fallback"
    assert seed3.stage == L.SEED_STAGE_TRAINING


async def test_simic_update_on_the_bus_changes_decisions_and_forgeries_do_not(
    make_client: Callable[..., OonaClient],
    keyring: KeyRing,
    tmp_path: Path,
    redis_client: aioredis.Redis,
) -> None:
    registry = TamiyoPolicyRegistry(germinate_policy(), policy_dir=tmp_path / "policy")
    controller = TamiyoController(keyring, KarnCatalog(), registry=registry)
    # Offline history: each germination was followed by a loss regression.
    reports = []
    for k in range(6):
        controller.evaluate(system_state(f"history-{k}", 1, 1.0))
        closing = controller.evaluate(system_state(f"history-{k}", 2, 1.5))
        assert closing.field_report is not None
        reports.append(closing.field_report)
    controller.drain_telemetry()
    simic = train_policy_update(reports, controller.registry)
    assert simic.update is not None

    tamiyo = make_client("tamiyo")
    trainer = make_client("trainer")
    service = TamiyoService(tamiyo, controller)

    async def probe(run_id: str) -> str:
        assert (await trainer.publish_state(system_state(run_id, 1, 1.0))).ok
        fields = await read_stream(redis_client, "oona.telemetry", decision_telemetry_for(run_id))
        return telemetry_action(fields)

    async with running(service):
        assert await probe("probe-before") == "germinate"
        assert (await publish_simic_update(make_client("simic"), simic)).ok
        accepted = await read_stream(
            redis_client,
            "oona.telemetry",
            lambda f: b"policy_update_accepted" in decoded(f)[1],
        )
        assert accepted
        assert controller.policy_version == 1
        assert await probe("probe-after") == "optimizer"

        weights = {k: v.copy() for k, v in controller.policy.weights.items()}
        # Forged 1: signed with a key Tamiyo does not hold -> Oona dead-letters it.
        outsider = make_client("simic-forged", ring=KeyRing(b"not-the-bus-secret-0123456789abcd"))
        forged = L.PolicyUpdate()
        forged.CopyFrom(simic.update)
        forged.version = 7
        forged.tamiyo_policy_version = "7"
        assert (await outsider.publish_policy_update(forged)).ok
        # Forged 2: the right key but a policy of another shape.
        wrong = TamiyoPolicy(PolicyConfig(hidden_dim=8))
        shaped = L.PolicyUpdate(
            version=8,
            tamiyo_policy_version="8",
            policy_id="tamiyo-default",
            payload=encode_policy(wrong, 8, "tamiyo-default"),
        )
        shaped.issued_at.GetCurrentTime()
        assert (await trainer.publish_policy_update(shaped)).ok
        # Forged 3: the genuine update again (a replay of an old version).
        assert (await trainer.publish_policy_update(simic.update)).ok
        letters: dict[str, dict[bytes, bytes]] = {}
        last = "0-0"
        async with asyncio.timeout(LIMIT_S):
            while len(letters) < 3:
                reply = await redis_client.xread({"oona.deadletter": last}, block=500)
                for _s, entries in reply or []:
                    for entry_id, fields in entries:
                        last = entry_id.decode()
                        letters[fields[b"reason"].decode()] = fields
        assert await probe("probe-after-forgeries") == "optimizer"

    assert set(letters) == {"bad_signature", "policy_shape_mismatch", "policy_stale_version"}
    assert all(f[b"source_stream"] == b"oona.policy" for f in letters.values())
    assert controller.policy_version == 1
    for key, value in controller.policy.weights.items():
        assert np.array_equal(value, weights[key])
    snap = service.metrics_snapshot()
    assert snap["policy_updates_accepted"] == 1
    assert snap["policy_updates_rejected.shape_mismatch"] == 1
    assert snap["policy_updates_rejected.stale_version"] == 1
    assert tamiyo.metrics_snapshot()["rejected.oona.policy.bad_signature"] == 1
    # Nothing left pending: rejected updates are never retried.
    assert (await redis_client.xpending("oona.policy", "tamiyo-policy.tamiyo-1"))["pending"] == 0


async def test_bad_commands_over_the_bus_are_rejected_without_state_change(
    make_client: Callable[..., OonaClient],
    libraries: Callable[[], UrzaLibrary],
    keyring: KeyRing,
) -> None:
    model = host_model("seed-1", "seed-2")
    manager = make_manager(libraries(), model, keyring)
    manager.set_kernel_provider(None)  # grafts go straight to the fallback: no bus kernel needed
    training = make_client("training")
    results: asyncio.Queue[tuple[L.AdaptationCommand, CommandResult]] = asyncio.Queue()
    intake = KasminaCommandIntake(training, manager, on_result=lambda c, r: results.put_nowait((c, r)))
    sender = make_client("sender")

    valid = germinate_command(keyring, "seed-1")
    tampered = germinate_command(keyring, "seed-2")
    tampered.seed_operation.blueprint_id = "BP002"  # changed after signing
    wrong_key = germinate_command(KeyRing(b"someone-else-0123456789abcdefghij"), "seed-2")
    cases = [
        ("applied", "", valid),
        ("rejected", "nonce_replayed", valid),
        ("rejected", "missing_signature", germinate_command(None, "seed-2")),
        ("rejected", "invalid_signature", tampered),
        ("rejected", "invalid_signature", wrong_key),
        ("rejected", "stale_command", germinate_command(keyring, "seed-2", issued_at=time.time() - 600)),
        ("rejected", "issued_in_future", germinate_command(keyring, "seed-2", issued_at=time.time() + 600)),
    ]
    async with running(intake):
        for status, reason, command in cases:
            assert (await sender.publish_command(command)).ok
            got, result = await asyncio.wait_for(results.get(), LIMIT_S)
            assert got.command_id == command.command_id
            assert (result.status, result.reason) == (status, reason), command.command_id
            if status == "rejected":
                assert set(manager.seeds) == {"seed-1"}

    assert set(manager.seeds) == {"seed-1"}
    assert manager.accepted_commands == 1
    assert dict(manager.rejections) == {
        "nonce_replayed": 1,
        "missing_signature": 1,
        "invalid_signature": 2,
        "stale_command": 1,
        "issued_in_future": 1,
    }
    snap = intake.metrics_snapshot()
    assert snap["kasmina.intake.total"] == len(cases)
    assert snap["kasmina.intake.rejected.invalid_signature"] == 2
