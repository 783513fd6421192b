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

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

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
        t = target
        settings = (t.group, t.consumer, str(t.replay_ttl_ms), str(t.cap or 0), str(t.dead_letter_cap))
        if any("\n" in value for value in (*settings, t.stream)):
            raise ValueError("stream, group and consumer names must not contain a newline")
        self._script = redis.register_script(COMMIT)
        self._keys = keys
        # What every call sends unchanged, encoded once: a commit of one entry is on every
        # message's path, and the client pays for each argument it encodes.
        self._fixed_keys = [keys.stream(t.stream).encode(), keys.stream(t.dead_letter_stream).encode()]
        self._settings = "\n".join((*settings, t.stream)).encode()
        self._replay_prefix = keys.replay(t.group, "")

    async def commit(self, items: Sequence[CommitItem]) -> list[str]:
        """Commit ``items``; one status per item (``ok``, ``dead``, ``replay`` or ``lost``)."""
        if not items:
            return []
        keys = self._keys
        # KEYS: source, dead letters, every reply stream once, then one replay key per claim.
        reply_streams: dict[str, int] = {}
        for item in items:
            if isinstance(item, Done) and item.replies:
                for reply in item.replies:
                    reply_streams.setdefault(keys.stream(reply.stream), 3 + len(reply_streams))
        replay_keys: list[str] = []
        words = [str(len(reply_streams))]
        values: list[bytes | str | int] = []
        for item in items:
            entry_id = item.entry_id
            if not _STREAM_ID.fullmatch(entry_id):
                raise ValueError(f"not a stream entry id: {entry_id[:40]!r}")
            if isinstance(item, Done):
                if item.replay_key is not None:
                    replay_keys.append(self._replay_prefix + item.replay_key)
                    words.append(f"c{entry_id}/{len(item.replies)}")
                else:
                    words.append(f"u{entry_id}/{len(item.replies)}")
                for reply in item.replies:
                    fields = reply.fields
                    values += (
                        reply_streams[keys.stream(reply.stream)],
                        fields[b"payload"],
                        fields[b"signature"],
                        fields.get(b"kid", b""),
                    )
            elif isinstance(item, Ack):
                words.append(f"a{entry_id}")
            else:
                words.append(f"d{entry_id}/{2 * len(item.fields)}")
                for name, value in item.fields.items():
                    values += (name, value)
        key_list: list[bytes | str] = [*self._fixed_keys, *reply_streams, *replay_keys]
        raw = await self._script(keys=key_list, args=[self._settings, " ".join(words), *values])
        letters = raw.decode() if isinstance(raw, bytes) else str(raw)
        if len(letters) != len(items):
            raise ResponseError(f"commit answered {len(letters)} statuses for {len(items)} entries")
        return [_STATUS[letter] for letter in letters]


#: The commit script's one-letter statuses.
_STATUS = {"o": "ok", "d": "dead", "r": "replay", "l": "lost"}
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
