"""Value types that cross the Oona API boundary: messages, replies, results and reasons."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar

from esper.leyline import leyline_pb2


class RejectReason(StrEnum):
    """Why an entry went to the dead-letter stream; each value is a ``reason`` field and a metric label."""

    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    UNEXPECTED_TYPE = "unexpected_type"
    STALE = "stale"
    FUTURE = "future"
    REPLAY = "replay"
    OVERSIZED = "oversized"
    #: The handler raised on the last delivery allowed.
    HANDLER_FAILED = "handler_failed"
    #: The handler overran its deadline on the last delivery allowed.
    HANDLER_TIMEOUT = "handler_timeout"
    #: Delivered the maximum number of times without ever finishing (its consumers died mid-handler).
    POISON = "poison"
    HANDLER_REJECTED = "handler_rejected"


_REASON = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class RejectMessage(Exception):
    """Raise from a handler to dead-letter the entry at once, without retries.

    For messages that are well-formed on the wire but refused by the
    application (e.g. a policy update with a stale version): retrying cannot
    help. A subscription dead-letters the entry with ``reason`` (a short
    lowercase token such as ``policy_stale_version``; anything else becomes
    ``handler_rejected``) and ``detail``; a broadcast reader counts and logs it.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason if _REASON.match(reason) else RejectReason.HANDLER_REJECTED.value
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)


class _Parseable(Protocol):
    def ParseFromString(self, serialized: bytes, /) -> int: ...


class Serializable(Protocol):
    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


M = TypeVar("M", bound=_Parseable)


@dataclass(frozen=True, slots=True)
class OonaMessage:
    """A verified message as a handler sees it.

    ``attempt`` is the server's delivery count for this entry in this group:
    1 on first delivery, higher when the entry is handled again after a
    failure, a missed deadline or the death of the consumer that had it.
    ``payload`` is the inner message's bytes; ``decode`` parses it.
    """

    stream: str
    entry_id: str
    message_type: leyline_pb2.BusMessageType.ValueType
    payload: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)
    attempt: int = 1
    kid: str | None = None
    group: str | None = None

    def decode(self, message_class: type[M]) -> M:
        """Parse ``payload`` as ``message_class`` (raises ``DecodeError`` on garbage)."""
        message = message_class()
        message.ParseFromString(self.payload)
        return message

    @property
    def type_name(self) -> str:
        return leyline_pb2.BusMessageType.Name(self.message_type)


@dataclass(frozen=True, slots=True)
class Reply:
    """A message a handler wants published once its entry is done.

    A subscription publishes a handler's replies in the same server round
    trip that acknowledges the entry (see :mod:`esper.oona.commit`): either
    the entry is acknowledged *and* every reply is on its stream, or neither
    happened and the entry is delivered again. The stream is chosen from the
    type and priority exactly as for :meth:`OonaClient.publish`.
    """

    message_type: leyline_pb2.BusMessageType.ValueType
    message: Serializable | bytes
    priority: leyline_pb2.MessagePriority.ValueType | None = None


Handler = Callable[[OonaMessage], Awaitable[Sequence[Reply] | None]]
"""An async callable: returning (optionally with replies) means done; raising means try again."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Outcome of one publish: never an exception for an expected refusal.

    ``reason`` is ``"backpressure"``, ``"breaker_open"``, ``"oversized"`` or
    ``"redis_error"`` when ``ok`` is False; ``entry_id`` is the Redis id when
    ``ok`` is True.
    """

    ok: bool
    stream: str
    entry_id: str | None = None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok
