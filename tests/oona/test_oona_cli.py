"""``esper-oona``: dead-letter inspection, replay to the rejecting group only, refusals, stream overview."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from oona_helpers import (
    CMD,
    DLQ,
    NORMAL,
    SECRET,
    Recorder,
    command,
    command_id,
    dead_letters,
    envelope_bytes,
    now_ms,
    signed,
)

from esper.core.worker import running
from esper.oona import OonaClient, OonaMessage
from esper.oona.cli import oona_main
from esper.security.signing import KeyRing


def json_lines(text: str) -> list[dict[str, Any]]:
    """CLI output lines (log lines printed meanwhile are skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, isolated_env: object, redis_url: str) -> str:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET.decode())
    return redis_url


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    capsys.readouterr()
    code = await asyncio.to_thread(oona_main, list(argv))
    captured = capsys.readouterr()
    return code, json_lines(captured.out), captured.err


async def test_dlq_list_show_replay_to_the_rejecting_group_only(
    cli_env: str,
    make_client: Callable[..., OonaClient],
    redis_client: aioredis.Redis,
    keyring: KeyRing,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_client()
    fail = True
    handled_a, handled_b = Recorder(), Recorder(2)
    commits_b: asyncio.Queue[list[str]] = asyncio.Queue()

    async def flaky(message: OonaMessage) -> None:
        if fail and command_id(message) == "again":
            raise RuntimeError("boom")
        await handled_a(message)

    sub_a = client.subscribe(NORMAL, "a", flaky, types={CMD})
    sub_b = client.subscribe(NORMAL, "b", handled_b, types={CMD}, on_committed=commits_b.put_nowait)
    async with running(sub_a.run, "a"), running(sub_b.run, "b"):
        await client.publish_command(command("both"))
        await client.publish_command(command("again"))
        await handled_b.wait()
        [failed] = await dead_letters(redis_client, 1)
        [(_id, both)] = (await redis_client.xrange(NORMAL, count=1))[:1]
        await redis_client.xadd(NORMAL, both)  # type: ignore[arg-type]  # replay x2
        for issued in (now_ms() - 600_000, now_ms() + 600_000):  # stale x2, future x2
            await redis_client.xadd(NORMAL, signed(keyring, envelope_bytes(issued_at_ms=issued)))  # type: ignore[arg-type]
        await redis_client.xadd(NORMAL, {b"payload": envelope_bytes()})  # type: ignore[arg-type]  # unsigned x2
        letters = await dead_letters(redis_client, 9)
        assert failed[b"reason"] == b"handler_failed"
        assert failed[b"group"] == b"a"

        code, rows, _err = await cli(capsys, "dlq", "list", "--limit", "20")
        assert code == 0
        assert len(rows) == 9
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_reason.setdefault(row["reason"], []).append(row)
        assert {r: len(v) for r, v in by_reason.items()} == {
            "handler_failed": 1,
            "replay": 2,
            "stale": 2,
            "future": 2,
            "unsigned": 2,
        }
        failed_id = by_reason["handler_failed"][0]["id"]
        code, [shown], _err = await cli(capsys, "dlq", "show", failed_id)
        assert code == 0
        assert shown["message_type"] == "BUS_MESSAGE_TYPE_ADAPTATION_COMMAND"
        assert (shown["source_stream"], shown["group"]) == (NORMAL, "a")
        assert set(shown["attributes"]) == {"issued_at_ms", "nonce", "source"}

        for reason in ("stale", "future", "replay", "unsigned"):
            code, _rows, err = await cli(capsys, "dlq", "replay", by_reason[reason][0]["id"])
            assert code == 1, reason
            assert "not replaying" in err
        code, _rows, err = await cli(capsys, "dlq", "replay", "1-1")
        assert (code, "no dead letter" in err) == (1, True)

        fail = False
        code, [done], _err = await cli(capsys, "dlq", "replay", failed_id)
        assert code == 0
        assert (done["stream"], done["group"]) == (NORMAL, "a")
        while done["entry_id"] not in await asyncio.wait_for(commits_b.get(), 10):
            pass  # group b acknowledged the handed-back copy without handling it
        handled_a.expect(2)
        await handled_a.wait()
    assert [command_id(m) for m in handled_a.messages] == ["both", "again"]
    assert handled_a.messages[1].attributes["target_group"] == "a"
    assert handled_b.ids == ["both", "again"]  # b never handled it again
    remaining = [eid.decode() for eid, _ in await redis_client.xrange(DLQ)]
    assert failed_id not in remaining
    assert len(remaining) == len(letters) - 1

    code, rows, _err = await cli(capsys, "streams")
    assert code == 0
    streams = {row["stream"]: row for row in rows}
    assert len(streams) == 8
    assert set(streams[NORMAL]["groups"]) == {"a", "b"}
    assert streams[NORMAL]["pending"] == 0
    assert streams[DLQ]["length"] == 8


async def test_a_failed_re_publish_keeps_the_dead_letter_and_force_replays_a_stale_one(
    cli_env: str,
    make_client: Callable[..., OonaClient],
    redis_client: aioredis.Redis,
    keyring: KeyRing,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_client()
    handled = Recorder(1)
    sub = client.subscribe(NORMAL, "a", handled, types={CMD})
    async with running(sub.run, "a"):
        stale = signed(keyring, envelope_bytes(issued_at_ms=now_ms() - 600_000))
        await redis_client.xadd(NORMAL, stale)  # type: ignore[arg-type]
        await dead_letters(redis_client, 1)
    [(letter_id, _f)] = await redis_client.xrange(DLQ)
    await redis_client.rename(NORMAL, "kept-aside")
    await redis_client.set(NORMAL, b"not a stream")
    code, _rows, err = await cli(capsys, "dlq", "replay", "--force", letter_id.decode())
    assert code == 1
    assert "the dead letter is kept" in err
    assert await redis_client.xlen(DLQ) == 1
    await redis_client.delete(NORMAL)
    await redis_client.rename("kept-aside", NORMAL)
    async with running(sub.run, "a"):
        code, [done], _err = await cli(capsys, "dlq", "replay", "--force", letter_id.decode())
        assert code == 0
        await handled.wait()
    assert handled.messages[0].entry_id == done["entry_id"]
    assert await redis_client.xlen(DLQ) == 0


async def test_dlq_list_pages_through_more_entries_than_one_reply_may_hold(
    cli_env: str, redis_client: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(1500):
            pipe.xadd(DLQ, {b"reason": b"unsigned", b"source_id": f"{i}-0".encode()})
        await pipe.execute()
    code, rows, _err = await cli(capsys, "dlq", "list", "--limit", "1200")
    assert code == 0
    assert [row["source_id"] for row in rows] == [f"{i}-0" for i in range(1499, 299, -1)]


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
    for word in ("dlq", "streams", "REDIS_URL"):
        assert word in out
