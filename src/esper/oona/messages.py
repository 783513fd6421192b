"""Value types that cross the Oona API boundary: messages, results and reasons."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar

from esper.leyline import leyline_pb2


class RejectReason(StrEnum):
    """Why a consumed entry was not handed to a handler (or why the handler gave up).

    Each value names a dead-letter ``reason`` field and a metric label.
    """

    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    UNEXPECTED_TYPE = "unexpected_type"
    STALE = "stale"
    FUTURE = "future"
    REPLAY = "replay"
    OVERSIZED = "oversized"
    HANDLER_FAILED = "handler_failed"
    HANDLER_REJECTED = "handler_rejected"


_REASON = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class RejectMessage(Exception):
    """Raise from a handler to dead-letter the entry at once, without retries.

    For messages that are well-formed on the wire but refused by the
    application (e.g. a policy update with a stale version): retrying cannot
    help. A group consumer copies the entry to the dead-letter stream with
    ``reason`` (a short lowercase token such as ``policy_stale_version``;
    anything else becomes ``handler_rejected``) and ``detail``, acks it and
    counts it under that reason; a broadcast reader counts and logs it.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason if _REASON.match(reason) else RejectReason.HANDLER_REJECTED.value
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)


class _Parseable(Protocol):
    def ParseFromString(self, serialized: bytes, /) -> int: ...


M = TypeVar("M", bound=_Parseable)


@dataclass(frozen=True, slots=True)
class OonaMessage:
    """A verified message as a handler sees it.

    ``attempt`` is 1 on first delivery and grows by one with each retry, so a
    handler can tell a redelivery from a new message. ``payload`` is the inner
    message's bytes; ``decode`` parses it into the Leyline type you expect.
    """

    stream: str
    entry_id: str
    message_type: leyline_pb2.BusMessageType.ValueType
    payload: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)
    attempt: int = 1
    kid: str | None = None

    def decode(self, message_class: type[M]) -> M:
        """Parse ``payload`` as ``message_class`` (raises ``DecodeError`` on garbage)."""
        message = message_class()
        message.ParseFromString(self.payload)
        return message

    @property
    def type_name(self) -> str:
        return leyline_pb2.BusMessageType.Name(self.message_type)


Handler = Callable[[OonaMessage], Awaitable[None]]
"""An async callable; returning means success (the entry is acked), raising means retry."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Outcome of one publish: never an exception for an expected refusal.

    ``reason`` is ``"backpressure"``, ``"breaker_open"`` or ``"redis_error"``
    when ``ok`` is False, and ``entry_id`` is the Redis id when ``ok`` is True.
    """

    ok: bool
    stream: str
    entry_id: str | None = None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok
