"""One delivery of one entry in one group: verify it, run the handler under its deadline, decide.

Every entry a subscription reads ends here in exactly one outcome. A copy
of a message this subscription committed recently is dead-lettered as
``replay`` before its handler runs (:meth:`Dispatcher.seen_here`, from memory:
no round trip). The claim that decides replays for good commits with the
entry's ack (:mod:`esper.oona.commit`), so a copy another replica committed
first may reach this handler, but its replies are dropped and it is
dead-lettered: its effects on the bus never happen twice, and handlers keep
their own side effects idempotent.

- a commit item (:mod:`esper.oona.commit`): acknowledged, dead-lettered with
  a reason, or done with the handler's signed replies;
- a :class:`Retry`: the handler failed or overran its deadline, the entry
  stays pending and is delivered again after a backoff — unless this was the
  last delivery allowed, or the retry would come after the message stops
  being fresh, in which case it is dead-lettered now (``handler_failed`` /
  ``handler_timeout``). An entry delivered more than ``max_deliveries`` times
  without ever finishing (its consumers kept dying) is dead-lettered as
  ``poison`` without running the handler again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from esper.core.logs import get_logger
from esper.oona import envelope
from esper.oona.commit import Ack, CommitItem, DeadLetter, Done, SignedReply
from esper.oona.config import DeliveryPolicy
from esper.oona.deadline import HandlerDeadline
from esper.oona.envelope import Accepted, Rejection
from esper.oona.link import Link
from esper.oona.messages import Handler, OonaMessage, RejectMessage, RejectReason, Reply
from esper.oona.wire_guard import DEFERRED

_log = get_logger("esper.oona.delivery")
#: Replay keys of recent commits remembered per subscription (each costs ~150 bytes).
_RECENT = 8192


@dataclass(frozen=True, slots=True)
class Retry:
    entry_id: str
    attempt: int
    due: float  # time.monotonic()


def has_deferred(fields: Mapping[bytes, bytes]) -> bool:
    """True when the reply budget ran out inside this entry (fetch it again on its own).

    Only values are ever deferred, always as the one shared marker.
    """
    return any(value is DEFERRED for value in fields.values())


class Dispatcher:
    """Verification and handling for one subscription (stream, group, handler, policy)."""

    def __init__(
        self,
        link: Link,
        stream: str,
        group: str,
        handler: Handler,
        *,
        types: frozenset[int],
        ignore_types: frozenset[int],
        policy: DeliveryPolicy,
    ) -> None:
        self.link = link
        self.stream = stream
        self.group = group
        self.handler = handler
        self.types = types
        self.ignore_types = ignore_types - types
        self._expected = self.types | self.ignore_types
        self.policy = policy
        self._recent: OrderedDict[str, float] = OrderedDict()

    # -- before the handler -------------------------------------------------------------

    def screen(
        self, entry_id: str, fields: Mapping[bytes, bytes] | None, attempt: int
    ) -> CommitItem | Accepted:
        """Everything decided without the handler: a commit item, or the message to handle."""
        if fields is None:  # deleted while pending: nothing left to do
            return Ack(entry_id)
        metrics = self.link.metrics
        outcome = self.link.verify(
            self.stream, entry_id, fields, self._expected, attempt=attempt, group=self.group
        )
        if isinstance(outcome, Rejection):
            return self.dead_letter(entry_id, fields, outcome.reason, outcome.detail)
        if outcome.target_group is not None and outcome.target_group != self.group:
            return Ack(entry_id)  # a dead letter handed back to another group
        if outcome.message.message_type in self.ignore_types:
            metrics.on_ignored(self.stream, 1)
            return Ack(entry_id)
        if attempt > self.policy.max_deliveries:
            metrics.on_rejected(self.stream, RejectReason.POISON.value)
            detail = f"delivered {attempt - 1} times without finishing"
            return self.dead_letter(entry_id, fields, RejectReason.POISON, detail)
        return outcome

    def dead_letter(
        self, entry_id: str, fields: Mapping[bytes, bytes], reason: RejectReason | str, detail: str
    ) -> DeadLetter:
        c = self.link.config
        return DeadLetter(
            entry_id,
            str(reason),
            envelope.dead_letter_fields(
                fields,
                reason=reason,
                stream=self.stream,
                entry_id=entry_id,
                group=self.group,
                detail=detail,
                max_payload_bytes=c.max_payload_bytes,
            ),
        )

    def seen_here(self, accepted: Accepted) -> bool:
        """Whether this subscription committed a message with this replay key within the replay window."""
        expires = self._recent.get(accepted.replay_key)
        if expires is None:
            return False
        if expires < time.monotonic():
            del self._recent[accepted.replay_key]
            return False
        return True

    def remember(self, replay_key: str) -> None:
        """A message with this key was committed: copies of it are replays from now on."""
        recent = self._recent
        recent[replay_key] = time.monotonic() + self.link.config.replay_ttl_ms / 1000
        recent.move_to_end(replay_key)
        while len(recent) > _RECENT:
            recent.popitem(last=False)

    def replayed(self, accepted: Accepted, fields: Mapping[bytes, bytes]) -> DeadLetter:
        self.link.metrics.on_rejected(self.stream, RejectReason.REPLAY.value)
        return self.dead_letter(accepted.message.entry_id, fields, RejectReason.REPLAY, "nonce already seen")

    # -- the handler ----------------------------------------------------------------------

    async def handle(
        self, accepted: Accepted, fields: Mapping[bytes, bytes], deadline: HandlerDeadline
    ) -> CommitItem | Retry:
        """Run the handler once for this delivery, under ``deadline`` (one per task), and decide.

        ``accepted`` comes from :meth:`screen` for this same delivery, so its message already
        carries ``attempt`` and this group.
        """
        message = accepted.message
        metrics = self.link.metrics
        started = time.perf_counter()
        try:
            async with deadline:
                produced = await self.handler(message)
        except RejectMessage as refusal:
            metrics.on_rejected(self.stream, refusal.reason)
            return self.dead_letter(message.entry_id, fields, refusal.reason, refusal.detail)
        except Exception as exc:  # noqa: BLE001 - a handler bug ends this delivery, never the reader
            metrics.on_handler_failed(self.stream, time.perf_counter() - started)
            timed_out = deadline.expired()
            return self._after_failure(message, fields, accepted.issued_ms, exc, timed_out=timed_out)
        metrics.on_consumed(self.stream, time.perf_counter() - started)
        return Done(message.entry_id, accepted.replay_key, self.sign(produced) if produced else ())

    def _after_failure(
        self,
        message: OonaMessage,
        fields: Mapping[bytes, bytes],
        issued_ms: int | None,
        exc: Exception,
        *,
        timed_out: bool,
    ) -> CommitItem | Retry:
        reason = RejectReason.HANDLER_TIMEOUT if timed_out else RejectReason.HANDLER_FAILED
        what = f"no result within {self.policy.handler_timeout_ms} ms" if timed_out else type(exc).__name__
        log_fields = {
            "stream": self.stream,
            "group": self.group,
            "entry_id": message.entry_id,
            "attempt": message.attempt,
            "error": what,
        }
        if timed_out:
            _log.warning("oona.handler_timeout", **log_fields)
        else:
            _log.warning("oona.handler_failed", exc_info=exc, **log_fields)
        delay = self.policy.backoff_s(message.attempt)
        fresh_until = None if issued_ms is None else issued_ms + self.link.config.freshness_window_ms
        too_late = fresh_until is not None and envelope.now_ms() + delay * 1000 > fresh_until
        if message.attempt >= self.policy.max_deliveries or too_late:
            self.link.metrics.on_rejected(self.stream, reason.value)
            detail = f"{what} on delivery {message.attempt}"
            if too_late and message.attempt < self.policy.max_deliveries:
                detail += "; a retry would come after the message is stale"
            return self.dead_letter(message.entry_id, fields, reason, detail)
        self.link.metrics.on_retry(self.stream)
        return Retry(message.entry_id, message.attempt, time.monotonic() + delay)

    def sign(self, produced: Sequence[Reply]) -> tuple[SignedReply, ...]:
        """The handler's replies as signed entries, each routed like a publish of its type."""
        c, ring = self.link.config, self.link.keyring
        out = []
        for reply in produced:
            body = (
                reply.message
                if isinstance(reply.message, bytes)
                else reply.message.SerializeToString(deterministic=True)
            )
            fields = envelope.signed_fields(
                ring, envelope.build_envelope(reply.message_type, body, source=c.source)
            )
            out.append(SignedReply(c.route(reply.message_type, reply.priority), fields))
        return tuple(out)
