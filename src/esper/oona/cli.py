"""``esper-oona``: inspect streams and the dead-letter queue, replay dead letters.

Reads REDIS_URL, the OONA_* stream names and ESPER_LEYLINE_SECRET from the
environment (or ``.env``). A bad or missing setting prints one line and exits
with status 2. ``dlq replay`` only re-publishes entries whose original
signature verifies, so replay can never launder a forged or unsigned entry
into a signed one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import DecodeError
from redis.exceptions import ResponseError

from esper.core.cli import run_main
from esper.core.errors import ConfigError
from esper.core.settings import EsperSettings, load_settings
from esper.leyline import leyline_pb2
from esper.oona import envelope
from esper.oona.client import OonaClient

EXIT_NOT_FOUND = 1


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _summary(entry_id: Any, fields: dict[bytes, bytes], *, full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": _text(entry_id)}
    for name in (b"reason", b"source_stream", b"source_id", b"kid", b"detail"):
        if name in fields:
            out[name.decode()] = _text(fields[name])
    payload = fields.get(envelope.PAYLOAD)
    out["payload_bytes"] = len(payload) if payload is not None else None
    if full and payload is not None:
        env = leyline_pb2.BusEnvelope()
        try:
            env.ParseFromString(payload)
            out["message_type"] = leyline_pb2.BusMessageType.Name(env.message_type)
            out["attributes"] = dict(env.attributes)
        except (DecodeError, ValueError):
            out["message_type"] = None
    return out


def _client(settings: EsperSettings) -> OonaClient:
    return OonaClient.from_settings(settings, group="esper-oona-cli")


async def _dlq_list(settings: EsperSettings, limit: int) -> int:
    async with _client(settings) as client:
        stream = client.config.dead_letter_stream
        entries: Any = await client.redis.xrevrange(stream, count=limit)
        for entry_id, fields in entries:
            print(json.dumps(_summary(entry_id, fields, full=False)))
    return 0


async def _dlq_show(settings: EsperSettings, entry_id: str) -> int:
    async with _client(settings) as client:
        entries: Any = await client.redis.xrange(client.config.dead_letter_stream, entry_id, entry_id)
        if not entries:
            print(f"error: no dead letter {entry_id}", file=sys.stderr)
            return EXIT_NOT_FOUND
        print(json.dumps(_summary(entries[0][0], entries[0][1], full=True)))
    return 0


async def _dlq_replay(settings: EsperSettings, entry_id: str) -> int:
    async with _client(settings) as client:
        dlq = client.config.dead_letter_stream
        entries: Any = await client.redis.xrange(dlq, entry_id, entry_id)
        if not entries:
            print(f"error: no dead letter {entry_id}", file=sys.stderr)
            return EXIT_NOT_FOUND
        fields: dict[bytes, bytes] = entries[0][1]
        payload = fields.get(envelope.PAYLOAD)
        kid = fields.get(envelope.KID)
        target = _text(fields.get(b"source_stream", b""))
        signature = fields.get(envelope.SIGNATURE)
        if (
            payload is None
            or not target
            or not client.keyring.verify(payload, signature, kid.decode("ascii", "replace") if kid else None)
        ):
            print("error: entry has no verifiable signed payload; refusing to re-sign it", file=sys.stderr)
            return EXIT_NOT_FOUND
        env = leyline_pb2.BusEnvelope()
        try:
            env.ParseFromString(payload)
        except (DecodeError, ValueError):
            print("error: payload is not a BusEnvelope", file=sys.stderr)
            return EXIT_NOT_FOUND
        new_fields = envelope.resign(
            client.keyring,
            env.message_type,
            env.payload,
            dict(env.attributes),
            source="esper-oona-cli",
            attempt=None,
        )
        async with client.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(target, new_fields)  # type: ignore[arg-type]
            pipe.xdel(dlq, entry_id)
            new_id, _deleted = await pipe.execute()
        print(json.dumps({"replayed": entry_id, "stream": target, "entry_id": _text(new_id)}))
    return 0


async def _streams(settings: EsperSettings) -> int:
    async with _client(settings) as client:
        for stream in client.config.streams:
            length = await client.redis.xlen(stream)
            try:
                infos: list[dict[str, Any]] = await client.redis.xinfo_groups(stream)
            except ResponseError:  # a missing stream simply has no groups
                infos = []
            print(
                json.dumps(
                    {
                        "stream": stream,
                        "length": length,
                        "groups": {
                            _text(i["name"]): {
                                "pending": int(i.get("pending") or 0),
                                "last_delivered_id": _text(i.get("last-delivered-id")),
                            }
                            for i in infos
                        },
                        "pending": sum(int(i.get("pending") or 0) for i in infos),
                    }
                )
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esper-oona",
        description="Inspect Oona streams and the dead-letter queue. Uses REDIS_URL, OONA_* stream "
        "names and ESPER_LEYLINE_SECRET (needed to verify and re-sign on replay). Exit status: 0 ok, "
        "1 entry not found or not replayable, 2 invalid configuration.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dlq = sub.add_parser("dlq", help="dead-letter queue (oona.deadletter)")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    lst = dsub.add_parser("list", help="newest dead letters first, one JSON object per line")
    lst.add_argument("--limit", type=int, default=20, help="how many entries to show (default 20)")
    show = dsub.add_parser("show", help="one dead letter with its decoded envelope attributes")
    show.add_argument("id", help="dead-letter entry id")
    replay = dsub.add_parser(
        "replay",
        help="re-publish the original envelope to its source stream, re-signed with a fresh nonce "
        "and issued_at_ms, then delete it from the dead-letter stream",
    )
    replay.add_argument("id", help="dead-letter entry id")
    sub.add_parser("streams", help="length, consumer groups and pending entries per stream")
    return parser


def oona_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        settings = load_settings(require_secret=True)
        if not settings.redis_url:
            raise ConfigError(["REDIS_URL: not set"])
        if args.command == "streams":
            return asyncio.run(_streams(settings))
        if args.dlq_command == "list":
            return asyncio.run(_dlq_list(settings, args.limit))
        if args.dlq_command == "show":
            return asyncio.run(_dlq_show(settings, args.id))
        return asyncio.run(_dlq_replay(settings, args.id))

    return run_main(body)


def main() -> None:
    sys.exit(oona_main())
