"""Training-run history shared by every Tamiyo replica, in Redis.

Why: consecutive packets of one training run reach different replicas of the
``tamiyo`` group, and a decision depends on the run's history (the loss
trend, a spike, the graft in progress, the command whose field report is
due). Keeping that history in one replica's memory made replicas disagree.
Here each run's history lives in one Redis key (bounded: one small JSON
document per run, expiring ``ttl_s`` after the run's last packet), and a
replica evaluates a packet only while it holds the run's lock, so packets of
one run are decided one at a time whichever replica receives them.

The document also remembers the last packet decided (its digest) and the
replies that decision produced. A packet delivered again — its consumer
died, or its commit was refused, after the decision was saved — gets the
same replies back, from any replica, without changing the history twice:
exactly-once effects across replicas.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from esper.core.logs import get_logger
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, Reply
from esper.tamiyo.run_state import RunState, decode_run, encode_run

_log = get_logger("esper.tamiyo.shared_runs")

# Take the run's lock and read its history in one round trip. KEYS: history, lock.
# ARGV: token, lock ms. Returns false when another replica holds the lock.
_HOLD = r"""
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1]) or ''
"""
# Save the history (with its expiry) and release the lock, only if we still hold it.
# KEYS: history, lock. ARGV: token, document, ttl ms. Returns 1, or 0 if the lock was lost.
_SAVE = r"""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
"""
_RELEASE = r"""
if redis.call('GET', KEYS[2]) == ARGV[1] then return redis.call('DEL', KEYS[2]) end
return 0
"""


class RunBusy(RuntimeError):
    """Another replica is deciding on this run right now; try the packet again shortly."""


class RunLockLost(RuntimeError):
    """The run's lock expired while deciding (and another replica may have taken it)."""


@dataclass
class HeldRun:
    """A run's history while its lock is held: update ``state``, then ``save``."""

    run_id: str
    state: RunState
    last_digest: str | None = None
    last_replies: tuple[Reply, ...] = field(default_factory=tuple)


class SharedRuns:
    """Run histories on ``client``'s server (keys ``tamiyo:run:<digest>``, under the bus's hash tag)."""

    def __init__(self, client: OonaClient, *, ttl_s: float = 86_400.0, lock_ms: int = 10_000) -> None:
        redis = client.redis
        self._prefix = f"{client.keys.prefix}tamiyo:run:"
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ms = lock_ms
        self._hold = redis.register_script(_HOLD)
        self._save = redis.register_script(_SAVE)
        self._release = redis.register_script(_RELEASE)

    def _keys(self, run_id: str) -> list[str]:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:32]
        return [f"{self._prefix}{digest}", f"{self._prefix}{digest}:lock"]

    @asynccontextmanager
    async def hold(self, run_id: str) -> AsyncIterator[tuple[HeldRun, str]]:
        """Lock the run and load its history; raises :class:`RunBusy` when another replica holds it."""
        keys, token = self._keys(run_id), uuid.uuid4().hex
        raw: Any = await self._hold(keys=keys, args=[token, self.lock_ms])
        if raw is None or raw is False:
            raise RunBusy(f"run {run_id[:64]!r} is being decided by another replica")
        held = _decode(run_id, raw)
        try:
            yield held, token
        finally:
            await self._release(keys=keys, args=[token])

    async def save(self, held: HeldRun, token: str, digest: str, replies: tuple[Reply, ...]) -> None:
        """Store the updated history and the decision's replies, releasing the lock."""
        document = json.dumps(
            {
                "run": encode_run(held.state),
                "last_digest": digest,
                "last_replies": [_reply(r) for r in replies],
            }
        )
        saved: Any = await self._save(keys=self._keys(held.run_id), args=[token, document, self.ttl_ms])
        if not int(saved):
            raise RunLockLost(f"lost the lock of run {held.run_id[:64]!r} while deciding")


def _reply(reply: Reply) -> list[Any]:
    body = (
        reply.message
        if isinstance(reply.message, bytes)
        else reply.message.SerializeToString(deterministic=True)
    )
    return [int(reply.message_type), base64.b64encode(body).decode(), reply.priority]


def _decode(run_id: str, raw: Any) -> HeldRun:
    """The stored document, or a fresh history when there is none (or it is unreadable)."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if not text:
        return HeldRun(run_id, RunState())
    try:
        view = json.loads(text)
        replies = tuple(
            Reply(
                leyline_pb2.BusMessageType.ValueType(int(kind)),
                base64.b64decode(body),
                None if priority is None else leyline_pb2.MessagePriority.ValueType(int(priority)),
            )
            for kind, body, priority in view.get("last_replies") or []
        )
        return HeldRun(run_id, decode_run(view["run"]), view.get("last_digest"), replies)
    except (ValueError, KeyError, TypeError) as exc:
        _log.warning("tamiyo.run_state_unreadable", run=run_id[:64], error=type(exc).__name__)
        return HeldRun(run_id, RunState())
