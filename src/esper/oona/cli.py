"""``esper-oona``: inspect streams and the dead-letter queue, hand dead letters back.

Reads REDIS_URL, the OONA_* stream names and ESPER_LEYLINE_SECRET from the
environment (or ``.env``). A bad or missing setting prints one line and exits
with status 2.

``dlq replay`` hands a dead letter back to the group that rejected it, and
only to that group: the message is re-signed with a fresh nonce and time and
addressed to that group (a signed ``target_group`` attribute, so no other
group handles it again). It re-publishes only entries whose original
signature verifies, so replay can never launder a forged entry into a signed
one; it refuses messages rejected as ``stale``, ``future`` or ``replay``
(acting on them late, or twice, is what those checks prevent) unless
``--force``; and the dead letter is deleted in the same server round trip
that re-publishes it, so a failed re-publish keeps it.
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
from esper.oona.link import REDIS_FAILURES
from esper.oona.scripts import REPLAY

EXIT_REFUSED = 1
_PAGE = 200
_GUARDED_REASONS = frozenset({"stale", "future", "replay"})


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _summary(entry_id: Any, fields: dict[bytes, bytes], *, full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": _text(entry_id)}
    for name in (b"reason", b"source_stream", b"source_id", b"group", b"kid", b"detail", b"payload_sha256"):
        if name in fields:
            out[name.decode()] = _text(fields[name])
    payload = fields.get(envelope.PAYLOAD)
    if payload is not None:
        out["payload_bytes"] = len(payload)
    elif b"payload_bytes" in fields:
        out["payload_bytes"] = int(fields[b"payload_bytes"])
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
    return OonaClient.from_settings(settings, instance="esper-oona-cli")


async def _dlq_list(settings: EsperSettings, limit: int) -> int:
    async with _client(settings) as client:
        stream = client.keys.stream(client.config.dead_letter_stream)
        # Pages well below the reply parser's cap on array sizes (see wire_guard.py).
        newest, left = "+", limit
        while left > 0:
            entries: Any = await client.redis.xrevrange(stream, max=newest, count=min(left, _PAGE))
            for entry_id, fields in entries:
                print(json.dumps(_summary(entry_id, fields, full=False)))
            if len(entries) < min(left, _PAGE):
                break
            left -= len(entries)
            newest = "(" + _text(entries[-1][0])
    return 0


async def _dlq_show(settings: EsperSettings, entry_id: str) -> int:
    async with _client(settings) as client:
        stream = client.keys.stream(client.config.dead_letter_stream)
        entries: Any = await client.redis.xrange(stream, entry_id, entry_id)
        if not entries:
            print(f"error: no dead letter {entry_id}", file=sys.stderr)
            return EXIT_REFUSED
        print(json.dumps(_summary(entries[0][0], entries[0][1], full=True)))
    return 0


def _refusal(fields: dict[bytes, bytes], client: OonaClient, *, force: bool) -> str | None:
    """Why this dead letter must not be replayed (None: it may)."""
    reason = _text(fields.get(b"reason", b""))
    if reason in _GUARDED_REASONS and not force:
        return f"it was rejected as {reason!r}; replaying it is what that check prevents (use --force)"
    payload, signature = fields.get(envelope.PAYLOAD), fields.get(envelope.SIGNATURE)
    kid = fields.get(envelope.KID)
    if payload is None or not fields.get(b"source_stream"):
        return "it has no payload to replay (oversized entries keep only a digest)"
    if not client.keyring.verify(payload, signature, kid.decode("ascii", "replace") if kid else None):
        return "its signature does not verify; refusing to re-sign it"
    if not fields.get(b"group") and not force:
        return "it does not name the group that rejected it (use --force to hand it to every group)"
    return None


async def _dlq_replay(settings: EsperSettings, entry_id: str, *, force: bool) -> int:
    async with _client(settings) as client:
        c, keys = client.config, client.keys
        dlq = keys.stream(c.dead_letter_stream)
        entries: Any = await client.redis.xrange(dlq, entry_id, entry_id)
        if not entries:
            print(f"error: no dead letter {entry_id}", file=sys.stderr)
            return EXIT_REFUSED
        fields: dict[bytes, bytes] = entries[0][1]
        refused = _refusal(fields, client, force=force)
        if refused is not None:
            print(f"error: not replaying {entry_id}: {refused}", file=sys.stderr)
            return EXIT_REFUSED
        env = leyline_pb2.BusEnvelope()
        try:
            env.ParseFromString(fields[envelope.PAYLOAD])
        except (DecodeError, ValueError):
            print(f"error: not replaying {entry_id}: its payload is not a BusEnvelope", file=sys.stderr)
            return EXIT_REFUSED
        target, group = _text(fields[b"source_stream"]), _text(fields.get(b"group", b"")) or None
        new_fields = envelope.resign(
            client.keyring,
            env.message_type,
            env.payload,
            dict(env.attributes),
            source="esper-oona-cli",
            target_group=group,
        )
        pairs = [part for name, value in new_fields.items() for part in (name, value)]
        script = client.redis.register_script(REPLAY)
        try:
            new_id = await script(keys=[keys.stream(target), dlq], args=[entry_id, c.cap or 0, *pairs])
        except REDIS_FAILURES as exc:
            print(
                f"error: re-publishing failed ({type(exc).__name__}: {exc}); the dead letter is kept",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        print(json.dumps({"replayed": entry_id, "stream": target, "group": group, "entry_id": _text(new_id)}))
    return 0


async def _streams(settings: EsperSettings) -> int:
    async with _client(settings) as client:
        for stream in client.config.streams:
            key = client.keys.stream(stream)
            length = await client.redis.xlen(key)
            try:
                infos: list[dict[str, Any]] = await client.redis.xinfo_groups(key)
            except ResponseError:  # a missing stream simply has no groups
                infos = []
            groups = {
                _text(i["name"]): {
                    "pending": int(i.get("pending") or 0),
                    "lag": i.get("lag"),
                    "last_delivered_id": _text(i.get("last-delivered-id")),
                }
                for i in infos
            }
            pending = sum(int(i.get("pending") or 0) for i in infos)
            print(json.dumps({"stream": stream, "length": length, "groups": groups, "pending": pending}))
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
        help="hand the message back to the group that rejected it (re-signed, fresh nonce and time), "
        "deleting the dead letter in the same step",
    )
    replay.add_argument("id", help="dead-letter entry id")
    replay.add_argument(
        "--force", action="store_true", help="also replay messages rejected as stale, future or replay"
    )
    sub.add_parser("streams", help="length, consumer groups, lag and pending entries per stream")
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
        return asyncio.run(_dlq_replay(settings, args.id, force=args.force))

    return run_main(body)


def main() -> None:
    sys.exit(oona_main())
