"""Wire format: building signed entries and checking consumed ones.

The CPU-only part of the verification pipeline lives here (signature →
envelope parse → expected type → freshness → replay key extraction) so it is
testable without Redis; the shared replay check itself needs Redis and is done
by the consumer with the key this module extracts.

Entry fields are byte-for-byte esper-lite v1 (``payload``, ``signature``) plus
``kid``; everything else that must be trusted (``issued_at_ms``, ``nonce``,
``source``, ``attempt``) rides inside the signed envelope attributes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from esper.leyline import leyline_pb2
from esper.oona.messages import OonaMessage, RejectReason
from esper.security.signing import KeyRing

PAYLOAD = b"payload"
SIGNATURE = b"signature"
KID = b"kid"
ISSUED_AT = "issued_at_ms"
NONCE = "nonce"
SOURCE = "source"
ATTEMPT = "attempt"

_KERNEL_V1 = frozenset(
    {
        leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST,
        leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY,
        leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR,
    }
)
_V1_REQUEST_ID: dict[int, type[Any]] = {
    leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST: leyline_pb2.KernelPrefetchRequest,
    leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY: leyline_pb2.KernelArtifactReady,
    leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR: leyline_pb2.KernelArtifactError,
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def build_envelope(
    message_type: leyline_pb2.BusMessageType.ValueType,
    payload: bytes,
    *,
    source: str,
    attempt: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize a fresh envelope: new nonce, current ``issued_at_ms``, deterministic bytes."""
    envelope = leyline_pb2.BusEnvelope(message_type=message_type, payload=payload)
    attrs = envelope.attributes
    if extra:
        attrs.update(extra)
    attrs[ISSUED_AT] = str(now_ms())
    attrs[NONCE] = uuid.uuid4().hex
    attrs[SOURCE] = source
    if attempt is not None and attempt > 1:
        attrs[ATTEMPT] = str(attempt)
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
    attempt: int | None,
) -> dict[bytes, bytes]:
    """A fresh signed copy of a message (retry or dead-letter replay): new nonce and time."""
    keep = {k: v for k, v in attributes.items() if k not in (ISSUED_AT, NONCE, SOURCE, ATTEMPT)}
    return signed_fields(
        keyring, build_envelope(message_type, payload, source=source, attempt=attempt, extra=keep)
    )


def entry_time_ms(entry_id: str) -> int:
    """Milliseconds part of a Redis stream id: when the entry arrived at the server."""
    return int(entry_id.split("-", 1)[0])


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class Accepted:
    message: OonaMessage
    replay_key: str


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def verify_entry(
    keyring: KeyRing,
    stream: str,
    entry_id: str,
    fields: Mapping[bytes, bytes],
    *,
    expected_types: frozenset[int] | None,
    freshness_window_ms: int,
    max_payload_bytes: int,
) -> Accepted | Rejection:
    """Run every check that needs no Redis, in the normative order.

    Returns the message plus the replay key (nonce, or ``<type>:<request_id>``
    for v1 kernel messages) for the caller to check in Redis, or a rejection.
    Never raises on hostile input.
    """
    payload = fields.get(PAYLOAD)
    if payload is None:
        return Rejection(RejectReason.MALFORMED, "entry has no payload field")
    if len(payload) > max_payload_bytes:
        return Rejection(RejectReason.OVERSIZED, f"payload {len(payload)} bytes > {max_payload_bytes}")
    signature = fields.get(SIGNATURE)
    if not signature:
        return Rejection(RejectReason.UNSIGNED, "entry has no signature")
    raw_kid = fields.get(KID)
    kid = _text(raw_kid)
    if raw_kid is not None and (kid is None or kid not in keyring.key_ids):
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

    arrival = entry_time_ms(entry_id)
    issued_text = attrs.get(ISSUED_AT)
    nonce = attrs.get(NONCE)
    v1_kernel = message_type in _KERNEL_V1 and issued_text is None and nonce is None
    issued: int | None
    if v1_kernel:
        found = _v1_kernel_fields(message_type, envelope.payload)
        if found is None:
            return Rejection(RejectReason.MALFORMED, "v1 kernel payload does not parse")
        request_id, issued = found
        if not request_id:
            return Rejection(RejectReason.MALFORMED, "v1 kernel message without request_id")
        replay_key = f"{message_type}:{request_id}"
        if message_type == leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST and issued is None:
            return Rejection(RejectReason.STALE, "v1 prefetch request without issued_at")
    else:
        if issued_text is None or not nonce:
            return Rejection(RejectReason.MALFORMED, "envelope lacks issued_at_ms or nonce")
        try:
            issued = int(issued_text)
        except ValueError:
            return Rejection(RejectReason.MALFORMED, "issued_at_ms is not an integer")
        replay_key = nonce
    if issued is not None:
        if issued < arrival - freshness_window_ms:
            return Rejection(RejectReason.STALE, f"issued {arrival - issued} ms before arrival")
        if issued > arrival + freshness_window_ms:
            return Rejection(RejectReason.FUTURE, f"issued {issued - arrival} ms after arrival")
    try:
        attempt = max(1, int(attrs.get(ATTEMPT, "1")))
    except ValueError:
        return Rejection(RejectReason.MALFORMED, "attempt is not an integer")
    message = OonaMessage(
        stream=stream,
        entry_id=entry_id,
        message_type=message_type,
        payload=envelope.payload,
        attributes=attrs,
        attempt=attempt,
        kid=kid,
    )
    return Accepted(message, replay_key)


def _v1_kernel_fields(message_type: int, payload: bytes) -> tuple[str, int | None] | None:
    """(request_id, issued_at in ms or None) from a v1 kernel payload."""
    cls = _V1_REQUEST_ID[message_type]
    inner = cls()
    try:
        inner.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError):
        return None
    issued: int | None = None
    if isinstance(inner, leyline_pb2.KernelPrefetchRequest):
        stamp = inner.issued_at
        if stamp.seconds or stamp.nanos:
            issued = stamp.seconds * 1000 + stamp.nanos // 1_000_000
    return inner.request_id, issued


def dead_letter_fields(
    fields: Mapping[bytes, bytes], *, reason: RejectReason | str, stream: str, entry_id: str, detail: str
) -> dict[bytes, bytes]:
    """The dead-letter entry: original payload/signature/kid untouched plus why and where from.

    ``detail`` is produced by this package (never from secrets or handler
    exception messages, which may contain anything), capped in length.
    """
    out: dict[bytes, bytes] = {}
    for name in (PAYLOAD, SIGNATURE, KID):
        value = fields.get(name)
        if value is not None:
            out[name] = value
    out[b"reason"] = str(reason).encode()
    out[b"source_stream"] = stream.encode()
    out[b"source_id"] = entry_id.encode()
    out[b"detail"] = detail[:200].encode("utf-8", "replace")
    return out
