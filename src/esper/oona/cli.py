"""``esper-oona``: inspect streams and the dead-letter queue, hand dead letters back.

Reads settings from the environment and ``.env`` in the working directory:
``REDIS_URL`` (unset: the embedded server the service keeps under
``ESPER_VAR_DIR``, found by its port and password files), the ``OONA_*``
stream names, and ``ESPER_LEYLINE_SECRET``, which only ``dlq replay`` needs
(to verify and re-sign); looking needs no secret. Every failure is one line
on stderr, never a traceback; URLs are shown with their password masked and
anything read from the bus is shown escaped and cut to a bounded length.

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
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import AuthenticationError, NoPermissionError, RedisClusterException, ResponseError

from esper.core.cli import EXIT_CONFIG, run_main
from esper.core.errors import ConfigError
from esper.core.redact import mask_url
from esper.core.settings import EsperSettings, load_settings
from esper.core.untrusted import ID_LIMIT, bounded
from esper.leyline import leyline_pb2
from esper.oona import envelope
from esper.oona.config import StreamConfig
from esper.oona.connection import connect
from esper.oona.keys import KeySpace
from esper.oona.link import REDIS_FAILURES, TRANSIENT
from esper.oona.scripts import REPLAY
from esper.oona.wire_guard import OmittedValue
from esper.security.signing import KeyRing

#: A dead letter that does not exist, or that must not be replayed.
EXIT_REFUSED = 1
_PAGE = 200
_GUARDED_REASONS = frozenset({"stale", "future", "replay"})
_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")
#: Free text from the bus (a rejection's detail, envelope attributes) is cut longer than ids are.
_TEXT_LIMIT = 1024
_MAX_ATTRIBUTES = 64
#: What using the bus may raise (a Cluster that cannot be reached raises a plain RedisClusterException).
_BUS_FAILURES: tuple[type[BaseException], ...] = (*REDIS_FAILURES, RedisClusterException)


class CliError(Exception):
    """A failure reported as one line on stderr with its exit status."""

    def __init__(self, message: str, status: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Bus:
    """What every command uses: a connection, the stream names and their keys."""

    redis: aioredis.Redis
    config: StreamConfig
    keys: KeySpace

    def stream(self, name: str) -> str:
        return self.keys.stream(name)


def _text(value: Any, limit: int = ID_LIMIT) -> str:
    """A value read from the bus, escaped and bounded for output."""
    return bounded(value if isinstance(value, bytes | str) else str(value), limit)


def _summary(entry_id: Any, fields: dict[bytes, bytes], *, full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": _text(entry_id)}
    for name in (b"reason", b"source_stream", b"source_id", b"group", b"kid", b"payload_sha256"):
        if name in fields:
            out[name.decode()] = _text(fields[name])
    if b"detail" in fields:
        out["detail"] = _text(fields[b"detail"], _TEXT_LIMIT)
    payload = fields.get(envelope.PAYLOAD)
    if isinstance(payload, OmittedValue):  # too large for the reply parser to keep
        if not payload.deferred:
            out["payload_bytes"] = payload.length
            out.setdefault("payload_sha256", payload.sha256)
        payload = None
    elif payload is not None:
        out["payload_bytes"] = len(payload)
    elif b"payload_bytes" in fields:  # an oversized entry dead-lettered by digest
        size = fields[b"payload_bytes"]
        out["payload_bytes"] = int(size) if size.isdigit() and len(size) <= 20 else _text(size)
    if full and payload is not None:
        env = leyline_pb2.BusEnvelope()
        try:
            env.ParseFromString(payload)
            out["message_type"] = leyline_pb2.BusMessageType.Name(env.message_type)
        except (DecodeError, ValueError):
            out["message_type"] = None
        else:
            items = sorted(env.attributes.items())
            out["attributes"] = {_text(k): _text(v, _TEXT_LIMIT) for k, v in items[:_MAX_ATTRIBUTES]}
            if len(items) > _MAX_ATTRIBUTES:
                out["attributes_omitted"] = len(items) - _MAX_ATTRIBUTES
    return out


@asynccontextmanager
async def open_bus(settings: EsperSettings, url: str) -> AsyncIterator[Bus]:
    config = StreamConfig.from_settings(settings, instance="esper-oona-cli")
    try:
        client = connect(url, config)
    except ValueError as exc:  # a port out of range, a Sentinel URL without a service...
        raise ConfigError([f"REDIS_URL: {_text(str(exc))}"]) from None
    try:
        yield Bus(client, config, KeySpace(config.hash_tag))
    finally:
        await client.aclose()


def _checked_id(entry_id: str) -> str:
    if not _ENTRY_ID.fullmatch(entry_id):
        raise CliError(
            f"{_text(entry_id)!r} is not a dead-letter id: ids look like 1712345678901-0 "
            "(see esper-oona dlq list)"
        )
    return entry_id


async def _dead_letter(bus: Bus, entry_id: str) -> tuple[Any, dict[bytes, bytes]]:
    entries: Any = await bus.redis.xrange(bus.stream(bus.config.dead_letter_stream), entry_id, entry_id)
    if not entries:
        raise CliError(f"no dead letter {entry_id} in {bus.config.dead_letter_stream}", EXIT_REFUSED)
    return entries[0][0], entries[0][1]


async def _dlq_list(bus: Bus, limit: int) -> int:
    stream = bus.stream(bus.config.dead_letter_stream)
    # Pages well below the reply parser's cap on array sizes (see wire_guard.py).
    newest, left, shown = "+", limit, 0
    while left > 0:
        entries: Any = await bus.redis.xrevrange(stream, max=newest, count=min(left, _PAGE))
        for entry_id, fields in entries:
            print(json.dumps(_summary(entry_id, fields, full=False)))
        shown += len(entries)
        if len(entries) < min(left, _PAGE):
            break
        left -= len(entries)
        newest = "(" + entries[-1][0].decode("ascii", "replace")
    if not shown:
        print(f"no dead letters in {bus.config.dead_letter_stream}", file=sys.stderr)
    return 0


async def _dlq_show(bus: Bus, entry_id: str) -> int:
    found_id, fields = await _dead_letter(bus, entry_id)
    print(json.dumps(_summary(found_id, fields, full=True)))
    return 0


def _refusal(fields: dict[bytes, bytes], keyring: KeyRing, *, force: bool) -> str | None:
    """Why this dead letter must not be replayed (None: it may)."""
    reason = fields.get(b"reason", b"").decode("utf-8", "replace")
    if reason in _GUARDED_REASONS and not force:
        return f"it was rejected as {reason!r}; replaying it is what that check prevents (use --force)"
    payload, signature = fields.get(envelope.PAYLOAD), fields.get(envelope.SIGNATURE)
    kid = fields.get(envelope.KID)
    if payload is None or isinstance(payload, OmittedValue) or not fields.get(b"source_stream"):
        return "it has no payload to replay (oversized entries keep only a digest)"
    if not keyring.verify(payload, signature, kid.decode("ascii", "replace") if kid else None):
        return "its signature does not verify; refusing to re-sign it"
    if not fields.get(b"group") and not force:
        return "it does not name the group that rejected it (use --force to hand it to every group)"
    return None


async def _dlq_replay(bus: Bus, keyring: KeyRing, entry_id: str, *, force: bool) -> int:
    _found, fields = await _dead_letter(bus, entry_id)
    refused = _refusal(fields, keyring, force=force)
    if refused is not None:
        raise CliError(f"not replaying {entry_id}: {refused}", EXIT_REFUSED)
    env = leyline_pb2.BusEnvelope()
    try:
        env.ParseFromString(fields[envelope.PAYLOAD])
    except (DecodeError, ValueError):
        raise CliError(f"not replaying {entry_id}: its payload is not a BusEnvelope", EXIT_REFUSED) from None
    target = fields[b"source_stream"].decode("utf-8", "replace")
    group = fields.get(b"group", b"").decode("utf-8", "replace") or None
    new_fields = envelope.resign(
        keyring,
        env.message_type,
        env.payload,
        dict(env.attributes),
        source="esper-oona-cli",
        target_group=group,
    )
    pairs = [part for name, value in new_fields.items() for part in (name, value)]
    script = bus.redis.register_script(REPLAY)
    dlq = bus.stream(bus.config.dead_letter_stream)
    try:
        new_id = await script(keys=[bus.stream(target), dlq], args=[entry_id, bus.config.cap or 0, *pairs])
    except REDIS_FAILURES as exc:
        raise CliError(
            f"re-publishing {entry_id} failed ({_reason(exc)}); the dead letter is kept", EXIT_REFUSED
        ) from None
    print(
        json.dumps(
            {
                "replayed": entry_id,
                "stream": _text(target),
                "group": None if group is None else _text(group),
                "entry_id": _text(new_id),
            }
        )
    )
    return 0


async def _streams(bus: Bus) -> int:
    rows = []
    for stream in bus.config.streams:
        key = bus.stream(stream)
        length = await bus.redis.xlen(key)
        try:
            infos: list[dict[str, Any]] = await bus.redis.xinfo_groups(key)
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
        rows.append({"stream": stream, "length": length, "groups": groups, "pending": pending})
        print(json.dumps(rows[-1]))
    if not any(row["length"] or row["groups"] for row in rows):
        print("the bus is empty: no stream has entries or consumer groups yet", file=sys.stderr)
    return 0


def _reason(exc: BaseException) -> str:
    return _text(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, 300)


def _bus_failure(exc: BaseException, settings: EsperSettings, url: str) -> CliError:
    """One line for a bus that cannot be used: unreachable, refusing the login, or refusing a command."""
    where, reason = mask_url(url), _reason(exc).rstrip(".")
    if settings.redis_url is None:
        home = settings.var_dir / "redis"
        origin = f"the embedded server under {home}"
        fix_login = f"the password in {home} does not match the running server"
        fix_reach = "is esper-weatherlight-service running with this ESPER_VAR_DIR?"
    else:
        origin, fix_login, fix_reach = (
            "REDIS_URL",
            "check the user and password in REDIS_URL",
            "is it running?",
        )
    if isinstance(exc, AuthenticationError | NoPermissionError):
        return CliError(f"the bus at {where} ({origin}) refused the login ({reason}); {fix_login}")
    if isinstance(exc, (*TRANSIENT, RedisClusterException)):
        return CliError(f"cannot reach the bus at {where} ({origin}): {reason}; {fix_reach}")
    return CliError(f"the bus at {where} ({origin}) refused a command: {reason}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esper-oona",
        description="Inspect Oona streams and the dead-letter queue. Reads the environment and .env in "
        "this directory: REDIS_URL (unset: the service's embedded server under ESPER_VAR_DIR), the "
        "OONA_* stream names, and ESPER_LEYLINE_SECRET, which only 'dlq replay' needs (to verify and "
        "re-sign). Output is one JSON object per line on stdout; an empty result says so on stderr.",
        epilog="Exit status: 0 ok (also when there is nothing to show); 1 no such dead letter, or it may "
        "not be replayed, or re-publishing it failed (it is kept); 2 invalid configuration or id, the bus "
        "unreachable, or the bus refusing the login.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dlq = sub.add_parser("dlq", help="dead-letter queue (oona.deadletter)")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    lst = dsub.add_parser("list", help="newest dead letters first, one JSON object per line")
    lst.add_argument("--limit", type=_positive, default=20, help="how many entries to show (default 20)")
    show = dsub.add_parser("show", help="one dead letter with its decoded envelope attributes")
    show.add_argument("id", help="dead-letter entry id")
    replay = dsub.add_parser(
        "replay",
        help="hand the message back to the group that rejected it (re-signed, fresh nonce and time), "
        "deleting the dead letter in the same step; needs ESPER_LEYLINE_SECRET",
    )
    replay.add_argument("id", help="dead-letter entry id")
    replay.add_argument(
        "--force", action="store_true", help="also replay messages rejected as stale, future or replay"
    )
    sub.add_parser("streams", help="length, consumer groups, lag and pending entries per stream")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def _command(args: argparse.Namespace, bus: Bus, keyring: KeyRing | None) -> int:
    if args.command == "streams":
        return await _streams(bus)
    if args.dlq_command == "list":
        return await _dlq_list(bus, args.limit)
    if args.dlq_command == "show":
        return await _dlq_show(bus, args.id)
    assert keyring is not None
    return await _dlq_replay(bus, keyring, args.id, force=args.force)


def oona_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    async def session(settings: EsperSettings, url: str, keyring: KeyRing | None) -> int:
        async with open_bus(settings, url) as bus:
            try:
                return await _command(args, bus, keyring)
            except BrokenPipeError:
                raise  # whoever read our output went away (e.g. `| head`): not the bus
            except _BUS_FAILURES as exc:
                raise _bus_failure(exc, settings, url) from None

    def body() -> int:
        settings = load_settings()
        replaying = args.command == "dlq" and args.dlq_command == "replay"
        keyring = KeyRing(*settings.signing_secrets()) if replaying else None
        try:
            if args.command == "dlq" and args.dlq_command in ("show", "replay"):
                _checked_id(args.id)
            return asyncio.run(session(settings, settings.bus_url(), keyring))
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.status

    return run_main(body)


def main() -> None:
    sys.exit(oona_main())
