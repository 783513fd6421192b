"""The documented least-privilege ACL users run the bus: the control plane's and a trainer's."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from oona_helpers import CMD, NORMAL, REPORT, Recorder, command, dead_letters

from esper.core.redis_server import RedisServer
from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, Reply

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "oona.md"
PASSWORDS = {"CONTROL-PASSWORD": "control-pw-0123456789", "TRAINER-PASSWORD": "trainer-pw-0123456789"}


def acl_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip().startswith("ACL SETUSER ")]


def test_the_readme_shows_the_same_acl_as_the_bus_documentation() -> None:
    assert acl_lines(ROOT / "README.md") == acl_lines(DOCS)


def documented_acl() -> list[list[str]]:
    lines = acl_lines(DOCS)
    assert [words[2] for words in lines] == ["esper-control", "esper-trainer"]
    return [
        [re.sub("|".join(PASSWORDS), lambda m: PASSWORDS[m.group(0)], w) for w in words] for words in lines
    ]


@pytest.fixture
async def acl_server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    server = redis_server_factory()
    admin = aioredis.Redis.from_url(server.url)
    try:
        for words in documented_acl():
            await admin.execute_command(*words)
    finally:
        await admin.aclose()
    return server


def as_user(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


async def test_the_bus_runs_as_the_documented_users(
    acl_server: RedisServer, make_client: Callable[..., OonaClient]
) -> None:
    control_url = as_user(acl_server, "esper-control", PASSWORDS["CONTROL-PASSWORD"])
    trainer_url = as_user(acl_server, "esper-trainer", PASSWORDS["TRAINER-PASSWORD"])
    control, trainer = (
        make_client(control_url, instance="wl-0"),
        make_client(trainer_url, instance="trainer-0"),
    )

    async def answer(message: OonaMessage) -> list[Reply]:
        return [Reply(pb.BUS_MESSAGE_TYPE_TELEMETRY, pb.TelemetryPacket(packet_id=message.entry_id))]

    replies = Recorder(1)
    subscription = control.subscribe(NORMAL, "tamiyo", answer, types={CMD})
    reader = trainer.broadcast(
        "oona.telemetry", replies, types={pb.BUS_MESSAGE_TYPE_TELEMETRY}, start_id="0-0"
    )
    async with running(subscription.run, "control"), running(reader.run, "trainer"):
        assert await trainer.publish_command(command("as-a-trainer"))  # the trainer may publish
        await replies.wait()  # the control plane handled it and committed its reply; the trainer read it
        # A rejected entry is dead-lettered by the control plane's user too.
        admin_url = acl_server.url
        admin = aioredis.Redis.from_url(admin_url)
        try:
            await admin.xadd(NORMAL, {b"payload": b"\x00unsigned"})
            [letter] = await dead_letters(admin, 1)
            assert letter[b"reason"] == b"unsigned"
        finally:
            await admin.aclose()
    report = await control.housekeeping()
    assert report.pending[NORMAL] == {"tamiyo": 0}
    assert await control.probe() is None  # the readiness write probe is allowed


async def test_a_trainer_cannot_tamper_with_groups_or_replay_keys(acl_server: RedisServer) -> None:
    trainer = aioredis.Redis.from_url(as_user(acl_server, "esper-trainer", PASSWORDS["TRAINER-PASSWORD"]))
    try:
        for forbidden in (
            ("XGROUP", "CREATE", NORMAL, "evil", "$", "MKSTREAM"),
            ("XTRIM", NORMAL, "MAXLEN", "0"),
            ("DEL", "oona:replay:tamiyo:n:abc"),
            ("SET", "oona:replay:tamiyo:n:abc", "x"),
            ("XACK", NORMAL, "tamiyo", "1-0"),
        ):
            with pytest.raises(aioredis.ResponseError, match=r"(?i)no permissions"):
                await trainer.execute_command(*forbidden)
    finally:
        await trainer.aclose()


async def test_a_trainer_without_scripting_still_skips_the_types_it_ignores(
    acl_server: RedisServer, make_client: Callable[..., OonaClient]
) -> None:
    control = make_client(
        as_user(acl_server, "esper-control", PASSWORDS["CONTROL-PASSWORD"]), instance="wl-0"
    )
    trainer = make_client(as_user(acl_server, "esper-trainer", PASSWORDS["TRAINER-PASSWORD"]), instance="t-0")
    commands = Recorder(1)
    reader = trainer.broadcast(NORMAL, commands, types={CMD}, ignore_types={REPORT}, start_id="0-0")
    assert await control.publish_field_report(pb.FieldReport(report_id="r-1"))
    assert await control.publish_command(command("for-the-trainer"))
    async with running(reader.run, "trainer"):
        await commands.wait()
    snapshot = trainer.metrics_snapshot()
    assert commands.ids == ["for-the-trainer"]
    assert snapshot[f"ignored.{NORMAL}"] == 1
