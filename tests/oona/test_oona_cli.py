"""``esper-oona``: dead-letter inspection and replay, stream overview, config errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from oona_helpers import SECRET, Recorder, dead_letters, running

from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage
from esper.oona.cli import oona_main

CMD = pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND


def json_lines(text: str) -> list[dict[str, object]]:
    """CLI output lines (consumer log lines printed meanwhile are skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, isolated_env: object, redis_url: str) -> str:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET.decode())
    return redis_url


async def test_dlq_list_show_replay_and_streams(
    cli_env: str,
    make_client: Callable[..., OonaClient],
    redis_client: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_client(retry_max_attempts=1)
    await client.ensure_consumer_groups()
    fail = True
    handled = Recorder(1)

    async def handler(message: OonaMessage) -> None:
        if fail:
            raise RuntimeError("boom")
        await handled(message)

    await client.publish_command(pb.AdaptationCommand(command_id="again"))
    await redis_client.xadd("oona.normal", {b"payload": b"forged"})
    consumer = client.consumer("oona.normal", handler, types={CMD})
    async with running(consumer):
        letters = await dead_letters(redis_client, 2)
        assert {letter[b"reason"] for letter in letters} == {b"handler_failed", b"unsigned"}
        capsys.readouterr()
        assert await asyncio.to_thread(oona_main, ["dlq", "list", "--limit", "5"]) == 0
        rows = json_lines(capsys.readouterr().out)
        by_reason = {row["reason"]: row for row in rows}
        assert set(by_reason) == {"handler_failed", "unsigned"}
        failed_id = by_reason["handler_failed"]["id"]
        assert await asyncio.to_thread(oona_main, ["dlq", "show", failed_id]) == 0
        [shown] = json_lines(capsys.readouterr().out)
        assert shown["message_type"] == "BUS_MESSAGE_TYPE_ADAPTATION_COMMAND"
        assert shown["source_stream"] == "oona.normal"
        # The forged entry is never re-signed.
        assert await asyncio.to_thread(oona_main, ["dlq", "replay", by_reason["unsigned"]["id"]]) == 1
        fail = False
        assert await asyncio.to_thread(oona_main, ["dlq", "replay", failed_id]) == 0
        await handled.wait()
    assert handled.messages[0].decode(pb.AdaptationCommand).command_id == "again"
    remaining = [eid.decode() for eid, _ in await redis_client.xrange("oona.deadletter")]
    assert failed_id not in remaining
    assert len(remaining) == 1
    capsys.readouterr()
    assert await asyncio.to_thread(oona_main, ["streams"]) == 0
    streams: dict[str, Any] = {str(row["stream"]): row for row in json_lines(capsys.readouterr().out)}
    assert len(streams) == 8
    assert streams["oona.normal"]["groups"]["test"]["pending"] == 0
    assert streams["oona.deadletter"]["length"] == 1


def test_missing_secret_is_one_line_exit_2(
    isolated_env: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert oona_main(["streams"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "ESPER_LEYLINE_SECRET" in err[0]


def test_help_documents_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        oona_main(["--help"])
    out = capsys.readouterr().out
    assert "dlq" in out
    assert "streams" in out
    assert "REDIS_URL" in out
