"""Adaptation-command verification, freshness *before* the nonce.

Order: signature, command id, issued_at present, not from the future, fresh,
and only then the replay ledger. Esper-lite v1 recorded the nonce before the
timestamp checks, so a stale or future-dated copy burned the id
and the genuine, fresh command was later rejected as a replay. Recording the
nonce last means only a command that passed every other check consumes its
id. The ledger uses the monotonic clock, so wall-clock jumps cannot expire
entries early; issued_at is compared with the wall clock because that is what
the issuer stamped.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from esper.leyline import leyline_pb2
from esper.security import SIGNATURE_ANNOTATION, KeyRing, verify_command

FUTURE_TOLERANCE_SECONDS = 5.0


class NonceLedger:
    """Command ids seen within ``ttl_seconds`` (monotonic), bounded in size."""

    def __init__(
        self,
        ttl_seconds: float = 300.0,
        max_entries: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def _purge(self, now: float) -> None:
        # Entries are kept in expiry order (move_to_end on insert), so the
        # oldest expiry is always first.
        while self._seen:
            key, expires = next(iter(self._seen.items()))
            if expires > now and len(self._seen) <= self.max_entries:
                break
            self._seen.pop(key)

    def seen(self, nonce: str) -> bool:
        now = self._clock()
        self._purge(now)
        return nonce in self._seen

    def register(self, nonce: str) -> bool:
        """Record ``nonce``; False if it was already recorded and not yet expired."""
        now = self._clock()
        self._purge(now)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + self.ttl_seconds
        self._seen.move_to_end(nonce)
        return True

    def __len__(self) -> int:
        return len(self._seen)


class CommandVerifier:
    """Returns ``""`` for an acceptable command, else the rejection reason."""

    def __init__(
        self,
        keys: KeyRing | None,
        *,
        freshness_window_seconds: float = 60.0,
        nonce_ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.freshness_window_seconds = freshness_window_seconds
        self._wall_clock = wall_clock
        self.ledger = NonceLedger(ttl_seconds=nonce_ttl_seconds, clock=clock)

    def verify(self, command: leyline_pb2.AdaptationCommand) -> str:
        if self.keys is None:
            return "verifier_unavailable"
        if not command.annotations.get(SIGNATURE_ANNOTATION):
            return "missing_signature"
        if not verify_command(command, self.keys):
            return "invalid_signature"
        if not command.command_id:
            return "missing_command_id"
        if not command.HasField("issued_at") or (
            command.issued_at.seconds == 0 and command.issued_at.nanos == 0
        ):
            return "missing_timestamp"
        issued = command.issued_at.seconds + command.issued_at.nanos / 1e9
        now = self._wall_clock()
        if issued - now > FUTURE_TOLERANCE_SECONDS:
            return "issued_in_future"
        if now - issued > self.freshness_window_seconds:
            return "stale_command"
        if not self.ledger.register(command.command_id):
            return "nonce_replayed"
        return ""
