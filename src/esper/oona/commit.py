"""Turning the outcome of a batch into one server round trip (the COMMIT script).

A subscription ends every entry it read with exactly one item:

- :class:`Ack`: nothing to publish (an ignored type, an entry addressed to
  another group, an entry deleted while pending);
- :class:`DeadLetter`: copy it to the dead-letter stream with a reason;
- :class:`Done`: the handler finished; claim its replay key and publish its
  replies (a key claimed already, by any entry, makes it a ``replay``).

:class:`Committer` sends a batch of them in one EVALSHA and returns one
status per item. Because the script only touches entries still pending for
this consumer, a commit that is retried after an error, or that races a
consumer which took the entry over, never publishes a reply twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from esper.oona.keys import KeySpace
from esper.oona.scripts import COMMIT


@dataclass(frozen=True, slots=True)
class Ack:
    entry_id: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    reason: str
    fields: Mapping[bytes, bytes]


@dataclass(frozen=True, slots=True)
class SignedReply:
    """A reply ready for the wire: its stream (logical name) and signed entry fields."""

    stream: str
    fields: Mapping[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Done:
    entry_id: str
    replay_key: str | None
    replies: Sequence[SignedReply] = field(default_factory=tuple)


CommitItem = Ack | DeadLetter | Done


@dataclass(frozen=True, slots=True)
class CommitTarget:
    """Where a subscription commits: its stream and group, as this consumer."""

    stream: str
    group: str
    consumer: str
    dead_letter_stream: str
    replay_ttl_ms: int
    cap: int | None
    dead_letter_cap: int


class Committer:
    """Sends batches of commit items for one subscription (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, keys: KeySpace, target: CommitTarget) -> None:
        self._script = redis.register_script(COMMIT)
        self._keys = keys
        t = target
        # What every call sends unchanged, encoded once: this runs once per batch on the hot path.
        self._fixed_keys = [keys.stream(t.stream).encode(), keys.stream(t.dead_letter_stream).encode()]
        self._fixed_args: list[bytes] = [
            t.group.encode(),
            t.consumer.encode(),
            b"%d" % t.replay_ttl_ms,
            b"%d" % (t.cap or 0),
            b"%d" % t.dead_letter_cap,
            t.stream.encode(),
        ]
        self._replay_prefix = keys.replay(t.group, "").encode()
        self._ref_prefix = f"{t.stream}/".encode()

    async def commit(self, items: Sequence[CommitItem]) -> list[str]:
        """Commit ``items``; one status per item (``ok``, ``dead``, ``replay`` or ``lost``)."""
        if not items:
            return []
        keys = self._keys
        # KEYS: source, dead letters, then every reply stream once, then one replay key per claim.
        reply_streams: dict[str, int] = {}
        for item in items:
            if isinstance(item, Done) and item.replies:
                for reply in item.replies:
                    reply_streams.setdefault(keys.stream(reply.stream), 3 + len(reply_streams))
        replay_keys: list[bytes] = []
        first_replay = 3 + len(reply_streams)
        body: list[bytes | str | int] = []
        for item in items:
            entry_id = item.entry_id.encode()
            if isinstance(item, Done):
                replay_index = 0
                if item.replay_key is not None:
                    replay_index = first_replay + len(replay_keys)
                    replay_keys.append(self._replay_prefix + item.replay_key.encode())
                body += (b"c", entry_id, replay_index, self._ref_prefix + entry_id, len(item.replies))
                for reply in item.replies:
                    fields = reply.fields
                    body += (
                        reply_streams[keys.stream(reply.stream)],
                        fields[b"payload"],
                        fields[b"signature"],
                        fields.get(b"kid", b""),
                    )
            elif isinstance(item, Ack):
                body += (b"a", entry_id)
            else:
                pairs = [part for name, value in item.fields.items() for part in (name, value)]
                body += (b"d", entry_id, len(pairs), *pairs)
        key_list: list[bytes | str] = [*self._fixed_keys, *reply_streams, *replay_keys]
        argv: list[bytes | str | int] = [*self._fixed_args, len(items), len(reply_streams), *body]
        raw = await self._script(keys=key_list, args=argv)
        return [s.decode() if isinstance(s, bytes) else str(s) for s in raw]
