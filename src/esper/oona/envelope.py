"""Wire format: building signed entries and checking consumed ones (no Redis here).

Entry fields are byte-for-byte esper-lite v1 (``payload``, ``signature``) plus
``kid``; everything that must be trusted (``issued_at_ms``, ``nonce``,
``source`` and, for a dead letter handed back to one group, ``target_group``)
rides inside the signed envelope attributes.

Checks run in the normative order: size → signature → envelope parse →
expected type → freshness → replay key. Freshness is judged against the
*reader's* clock, from the signed ``issued_at_ms`` (or a v1 payload's own
timestamp), never from the entry id, which any writer may choose. The replay
key is read before the handler runs and claimed when the entry is committed;
both need Redis.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from esper.leyline import leyline_pb2
from esper.oona.messages import OonaMessage, RejectReason
from esper.oona.wire_guard import OmittedValue
from esper.security.signing import KeyRing

PAYLOAD = b"payload"
SIGNATURE = b"signature"
KID = b"kid"
ISSUED_AT = "issued_at_ms"
NONCE = "nonce"
SOURCE = "source"
TARGET_GROUP = "target_group"
_MAX_NONCE = 128
_MAX_SIGNATURE = 512
_T = leyline_pb2


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _uuid4_hex() -> str:
    """A random UUID (version 4) as 32 hex digits, as ``uuid.uuid4().hex`` but without the object."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def build_envelope(
    message_type: leyline_pb2.BusMessageType.ValueType,
    payload: bytes,
    *,
    source: str,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize a fresh envelope: new nonce, current ``issued_at_ms``, deterministic bytes."""
    envelope = leyline_pb2.BusEnvelope(message_type=message_type, payload=payload)
    attrs = envelope.attributes
    if extra:
        attrs.update(extra)
    attrs[ISSUED_AT] = str(now_ms())
    attrs[NONCE] = _uuid4_hex()
    attrs[SOURCE] = source
    return envelope.SerializeToString(deterministic=True)


def signed_fields(keyring: KeyRing, envelope_bytes: bytes) -> dict[bytes, bytes]:
    """The entry fields for ``envelope_bytes``: signature over exactly those bytes, plus ``kid``."""
    return {
        PAYLOAD: envelope_bytes,
        SIGNATURE: keyring.sign(envelope_bytes).encode("ascii"),
        KID: keyring.kid.encode("ascii"),
    }


def resign(
    keyring: KeyRing,
    message_type: leyline_pb2.BusMessageType.ValueType,
    payload: bytes,
    attributes: Mapping[str, str],
    *,
    source: str,
    target_group: str | None = None,
) -> dict[bytes, bytes]:
    """A fresh signed copy of a message (a dead letter replayed): new nonce and time."""
    keep = {k: v for k, v in attributes.items() if k not in (ISSUED_AT, NONCE, SOURCE, TARGET_GROUP)}
    if target_group:
        keep[TARGET_GROUP] = target_group
    return signed_fields(keyring, build_envelope(message_type, payload, source=source, extra=keep))


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """A verified message, its replay key, the group it is addressed to (if any) and when it was issued."""

    message: OonaMessage
    replay_key: str
    target_group: str | None = None
    issued_ms: int | None = None


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def peek_message_type(payload: bytes) -> int | None:
    """The ``message_type`` an envelope claims, read without verifying it; None if not plainly there.

    For readers that skip whole types (a broadcast reader sees every reply on
    a stream it shares): deciding to skip needs no signature, because a
    skipped entry is never acted on, and an HMAC over every uninteresting
    entry was most of such a reader's work. Deterministic serialization puts
    field 1 first, as a one- or two-byte varint for every type we define.
    """
    if len(payload) < 2 or payload[0] != 0x08:
        return None
    first = payload[1]
    if first < 0x80:
        return first
    if len(payload) < 3 or payload[2] >= 0x80:
        return None
    return (first & 0x7F) | (payload[2] << 7)


def verify_entry(
    keyring: KeyRing,
    stream: str,
    entry_id: str,
    fields: Mapping[bytes, bytes],
    *,
    expected_types: frozenset[int] | None,
    now: int,
    freshness_window_ms: int,
    max_payload_bytes: int,
    attempt: int = 1,
    group: str | None = None,
) -> Accepted | Rejection:
    """Run every check that needs no Redis; ``now`` is the reader's clock in ms. Never raises.

    ``attempt`` and ``group`` describe this delivery and are passed on to the handler's message.
    """
    payload = fields.get(PAYLOAD)
    if payload is None:
        return Rejection(RejectReason.MALFORMED, "entry has no payload field")
    if isinstance(payload, OmittedValue) or len(payload) > max_payload_bytes:
        size = payload.length if isinstance(payload, OmittedValue) else len(payload)
        return Rejection(RejectReason.OVERSIZED, f"payload {size} bytes > {max_payload_bytes}")
    signature = fields.get(SIGNATURE)
    if not signature or isinstance(signature, OmittedValue) or len(signature) > _MAX_SIGNATURE:
        return Rejection(RejectReason.UNSIGNED, "entry has no usable signature")
    raw_kid = fields.get(KID)
    kid = _text(raw_kid)
    if raw_kid is not None and (kid is None or not keyring.knows(kid)):
        return Rejection(RejectReason.BAD_SIGNATURE, "unknown key id")
    if not keyring.verify(payload, signature, kid):
        return Rejection(RejectReason.BAD_SIGNATURE, "signature does not match payload")

    envelope = leyline_pb2.BusEnvelope()
    try:
        envelope.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError) as exc:
        return Rejection(RejectReason.MALFORMED, f"envelope does not parse: {type(exc).__name__}")
    message_type = envelope.message_type
    if expected_types is not None and message_type not in expected_types:
        return Rejection(RejectReason.UNEXPECTED_TYPE, f"type {message_type} not expected on {stream}")
    attrs = dict(envelope.attributes)
    inner = envelope.payload  # each access copies the bytes
    found = _issued_and_replay_key(message_type, inner, payload, attrs)
    if isinstance(found, Rejection):
        return found
    issued, replay_key = found
    if issued is not None:
        if issued < now - freshness_window_ms:
            return Rejection(RejectReason.STALE, f"issued {now - issued} ms before it was read")
        if issued > now + freshness_window_ms:
            return Rejection(RejectReason.FUTURE, f"issued {issued - now} ms after it was read")
    message = OonaMessage(
        stream=stream,
        entry_id=entry_id,
        message_type=message_type,
        payload=inner,
        attributes=attrs,
        attempt=attempt,
        kid=kid,
        group=group,
    )
    return Accepted(message, replay_key, attrs.get(TARGET_GROUP) or None, issued)


def _issued_and_replay_key(
    message_type: int, inner: bytes, signed: bytes, attrs: Mapping[str, str]
) -> tuple[int | None, str] | Rejection:
    """(issued_at in ms or None when it cannot be judged, replay key) for our envelope or a v1 one."""
    issued_text, nonce = attrs.get(ISSUED_AT), attrs.get(NONCE)
    if issued_text is not None or nonce is not None:
        if not issued_text or not nonce:
            return Rejection(RejectReason.MALFORMED, "envelope lacks issued_at_ms or nonce")
        if len(nonce) > _MAX_NONCE:
            return Rejection(RejectReason.MALFORMED, f"nonce longer than {_MAX_NONCE} characters")
        if not issued_text.isascii() or not issued_text.isdigit() or len(issued_text) > 15:
            return Rejection(RejectReason.MALFORMED, "issued_at_ms is not a decimal millisecond time")
        return int(issued_text), f"n:{nonce}"
    reader = _V1_READERS.get(message_type)
    if reader is None:
        return Rejection(RejectReason.MALFORMED, "v1 message of a type that carries no timestamp")
    try:
        issued, request_id = reader(inner)
    except (DecodeError, ValueError, RuntimeError, OverflowError):
        return Rejection(RejectReason.MALFORMED, "v1 payload does not parse")
    if message_type in _V1_NEEDS_TIME and issued is None:
        return Rejection(RejectReason.STALE, "v1 message without a timestamp")
    if request_id is not None:
        if not request_id:
            return Rejection(RejectReason.MALFORMED, "v1 kernel message without request_id")
        return issued, f"r:{message_type}:{hashlib.sha256(request_id.encode()).hexdigest()[:32]}"
    return issued, f"d:{hashlib.sha256(signed).hexdigest()}"


def _stamp_ms(stamp: Any) -> int | None:
    if not (stamp.seconds or stamp.nanos):
        return None
    return int(stamp.seconds) * 1000 + int(stamp.nanos) // 1_000_000


def _parse(cls: type[Any], data: bytes) -> Any:
    message = cls()
    message.ParseFromString(data)
    return message


def _v1_request(data: bytes) -> tuple[int | None, str | None]:
    request = _parse(_T.KernelPrefetchRequest, data)
    return _stamp_ms(request.issued_at), request.request_id


def _v1_reply(cls: type[Any]) -> Callable[[bytes], tuple[int | None, str | None]]:
    def read(data: bytes) -> tuple[int | None, str | None]:
        return None, _parse(cls, data).request_id

    return read


def _v1_stamped(cls: type[Any], stamp_field: str) -> Callable[[bytes], tuple[int | None, str | None]]:
    def read(data: bytes) -> tuple[int | None, str | None]:
        return _stamp_ms(getattr(_parse(cls, data), stamp_field)), None

    return read


def _v1_state(data: bytes) -> tuple[int | None, str | None]:
    stamp_ns = _parse(_T.SystemStatePacket, data).timestamp_ns
    return (stamp_ns // 1_000_000 if stamp_ns else None), None


#: How to find the time (and for kernel replies the request id) of a v1 peer's message, by type.
#: Kernel replies carry no time: their replay key is the request id, and freshness is the requester's.
_V1_READERS: dict[int, Callable[[bytes], tuple[int | None, str | None]]] = {
    _T.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST: _v1_request,
    _T.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY: _v1_reply(_T.KernelArtifactReady),
    _T.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR: _v1_reply(_T.KernelArtifactError),
    _T.BUS_MESSAGE_TYPE_TELEMETRY: _v1_stamped(_T.TelemetryPacket, "timestamp"),
    _T.BUS_MESSAGE_TYPE_SYSTEM_STATE: _v1_state,
    _T.BUS_MESSAGE_TYPE_FIELD_REPORT: _v1_stamped(_T.FieldReport, "issued_at"),
    _T.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: _v1_stamped(_T.AdaptationCommand, "issued_at"),
    _T.BUS_MESSAGE_TYPE_POLICY_UPDATE: _v1_stamped(_T.PolicyUpdate, "issued_at"),
}
_V1_NEEDS_TIME = frozenset(_V1_READERS) - {
    _T.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY,
    _T.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR,
}


def dead_letter_fields(
    fields: Mapping[bytes, bytes],
    *,
    reason: RejectReason | str,
    stream: str,
    entry_id: str,
    group: str,
    detail: str,
    max_payload_bytes: int,
) -> dict[bytes, bytes]:
    """The dead-letter entry: the original payload/signature/kid plus why, where from and which group.

    An oversized payload is stored as its length and SHA-256, never copied.
    ``detail`` is produced by this package (never from secrets or handler
    exception messages, which may contain anything), capped in length.
    """
    out: dict[bytes, bytes] = {}
    payload = fields.get(PAYLOAD)
    if isinstance(payload, OmittedValue) and payload.deferred:
        pass  # the entry as a whole was larger than a read may hold: nothing of it was kept
    elif isinstance(payload, OmittedValue):
        out[b"payload_bytes"] = str(payload.length).encode()
        out[b"payload_sha256"] = payload.sha256.encode()
    elif payload is not None and len(payload) > max_payload_bytes:
        out[b"payload_bytes"] = str(len(payload)).encode()
        out[b"payload_sha256"] = hashlib.sha256(payload).hexdigest().encode()
    elif payload is not None:
        out[PAYLOAD] = payload
    for name in (SIGNATURE, KID):
        value = fields.get(name)
        if value is not None and not isinstance(value, OmittedValue) and len(value) <= _MAX_SIGNATURE:
            out[name] = value
    out[b"reason"] = str(reason).encode()
    out[b"source_stream"] = stream.encode()
    out[b"source_id"] = entry_id.encode()
    out[b"group"] = group.encode()
    out[b"detail"] = detail[:200].encode("utf-8", "replace")
    return out
