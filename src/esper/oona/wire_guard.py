"""A reply parser that never holds more than a bounded amount of entry data in memory.

Why: any client that can write to a stream can write an entry of hundreds of
megabytes (or one with millions of fields), and an unguarded reader
materialises every value of a reply while redis-py keeps a second copy for
re-parsing. Six such entries once drove a reader to 9 GB. This parser:

- streams every bulk string longer than ``max_value_bytes`` through SHA-256
  without keeping it, returning an :class:`OmittedValue` with its length and
  digest (what the dead-letter stream stores instead of a copy);
- discards any array of more than ``max_items`` elements the same way (no
  command the bus sends gets such a reply legitimately; an entry with that
  many fields is hostile) and returns ``[b"payload", OmittedValue]`` in its
  place, so the entry reads as one oversized payload. Discarding costs time
  per element, and a whole reply must arrive within the socket timeout, so
  an array of more than ``64 * max_items`` elements is not read at all: the
  connection is dropped and :class:`OversizedEntry` names the entry id read
  just before it (readers dead-letter that entry without ever reading it);
- once one reply has used ``max_reply_bytes``, returns the shared
  :data:`DEFERRED` marker for further values longer than 128 bytes (ids,
  field names and signatures are always kept): they are legitimate, so the
  reader leaves their entries pending and fetches them again on their own.

It plugs into redis-py as the connection's ``parser_class`` and mirrors the
RESP2 parser of redis-py 8 (``_readline``/``_read``/``_stream``); the
wire-guard tests fail loudly if those internals change.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

from redis._parsers import _AsyncRESP2Parser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError

_CHUNK = 1 << 16
#: What one kept element costs besides its bytes (object header, list slot), counted against the budget.
_ITEM_COST = 64
#: Values this short (entry ids, field names, signatures) are never deferred: an entry whose id
#: was deferred could not be fetched again. Their number per reply is bounded by the array caps.
_ALWAYS_KEPT = 128
#: The default ``max_items``: no reply the bus asks for legitimately has a longer array, so it also
#: bounds how many entries one read may ask for.
MAX_ITEMS = 1024
#: Arrays longer than this many times ``max_items`` are not even discarded (see the module docstring).
_DISCARD_FACTOR = 64


class OversizedEntry(RedisError):
    """A reply held an array too large even to discard; the connection was dropped.

    ``entry_id`` is the short value read just before that array: in the stream
    replies the bus reads (XREADGROUP, XREAD, XRANGE, XCLAIM), the id of the
    entry whose fields it is.
    """

    def __init__(self, entry_id: str | None, elements: int) -> None:
        self.entry_id = entry_id
        self.elements = elements
        super().__init__(f"entry {entry_id} has {elements} fields and values")


class OmittedValue(bytes):
    """An empty ``bytes`` standing in for a value that was not kept; see the module docstring."""

    length: int
    sha256: str
    deferred: bool

    def __new__(cls, length: int, sha256: str, *, deferred: bool) -> OmittedValue:
        value = super().__new__(cls, b"")
        value.length = length
        value.sha256 = sha256
        value.deferred = deferred
        return value

    def __repr__(self) -> str:
        if self.deferred:
            return "OmittedValue(deferred)"
        return f"OmittedValue({self.length} bytes, sha256={self.sha256[:12]}...)"


#: Returned for values beyond a reply's budget; one shared object, so deferring allocates nothing.
DEFERRED = OmittedValue(0, "", deferred=True)


class BoundedParser(_AsyncRESP2Parser):
    """RESP2 parser with per-value, per-array and per-reply limits (see :func:`bounded_parser`)."""

    max_value_bytes: ClassVar[int] = 1 << 20
    max_reply_bytes: ClassVar[int] = 8 << 20
    max_items: ClassVar[int] = MAX_ITEMS

    def __init__(self, socket_read_size: int) -> None:
        super().__init__(socket_read_size)
        self._budget = self.max_reply_bytes
        self._skipped = False
        self._last_short: bytes | None = None

    async def read_response(self, disable_decoding: bool = False) -> Any:
        if self._chunks and self._skipped:
            # A reply interrupted after data was streamed past cannot be re-parsed from the
            # buffered chunks (that data was never kept): drop the connection instead.
            self.on_disconnect()  # type: ignore[no-untyped-call]
            raise RedisConnectionError("reply interrupted while omitting a large value")
        self._budget = self.max_reply_bytes
        self._skipped = False
        self._last_short = None
        return await super().read_response(disable_decoding)

    async def _read_response(self, disable_decoding: bool = False) -> Any:
        raw = await self._readline()
        byte, rest = raw[:1], raw[1:]
        response: Any
        if byte == b"-":
            error = self.parse_error(rest.decode("utf-8", errors="replace"))  # type: ignore[no-untyped-call]
            if isinstance(error, RedisConnectionError):
                self._clear()  # type: ignore[no-untyped-call]
                raise error
            return error
        if byte == b"+":
            response = rest
        elif byte == b":":
            return int(rest)
        elif byte == b"$":
            if rest == b"-1":
                return None
            length = int(rest)
            if length > self.max_value_bytes:
                return await self._omit_value(length)
            if length > _ALWAYS_KEPT and length + _ITEM_COST > self._budget:
                await self._omit_value(length)
                return DEFERRED
            self._budget -= length + _ITEM_COST
            response = await self._read(length)
            if length <= _ALWAYS_KEPT:
                self._last_short = response
        elif byte == b"*":
            if rest == b"-1":
                return None
            count = int(rest)
            if count > _DISCARD_FACTOR * self.max_items:
                self.on_disconnect()  # type: ignore[no-untyped-call]
                last = self._last_short
                raise OversizedEntry(last.decode("ascii", "replace") if last is not None else None, count)
            if count > self.max_items:
                length, digest = await self._discard(count)
                return [b"payload", OmittedValue(length, digest, deferred=False)]
            self._budget -= count * 8
            response = [await self._read_response(disable_decoding) for _ in range(count)]
        else:
            raise InvalidResponse(f"Protocol Error: {raw[:64]!r}")
        if disable_decoding is False:
            response = self.encoder.decode(response)  # type: ignore[union-attr]
        return response

    # -- reading without keeping -----------------------------------------------------------

    def _take_buffered(self, limit: int) -> bytes:
        """Bytes already buffered for this reply (only after a resumed parse), at most ``limit``."""
        taken = self._buffer[self._pos : self._pos + limit]
        self._pos += len(taken)
        return taken

    async def _stream_through(self, want: int, digest: Any, data_bytes: int) -> None:
        """Consume ``want`` bytes, feeding the first ``data_bytes`` of them to ``digest``."""
        self._skipped = True
        seen = 0
        buffered = self._take_buffered(want)
        if buffered:
            digest.update(buffered[:data_bytes])
            seen = len(buffered)
        stream = self._stream
        if stream is None:
            raise RedisConnectionError("connection closed while reading a reply")
        try:
            while seen < want:
                chunk = await stream.read(min(_CHUNK, want - seen))
                if not chunk:
                    raise RedisConnectionError("connection closed while reading a reply")
                if seen < data_bytes:
                    digest.update(chunk[: data_bytes - seen])
                seen += len(chunk)
        except BaseException:
            self.on_disconnect()  # type: ignore[no-untyped-call]
            raise

    async def _omit_value(self, length: int) -> OmittedValue:
        digest = hashlib.sha256()
        await self._stream_through(length + 2, digest, length)
        return OmittedValue(length, digest.hexdigest(), deferred=False)

    async def _raw_line(self) -> bytes:
        """One protocol line, read without recording it for re-parsing (discard mode only)."""
        found = self._buffer.find(b"\r\n", self._pos)
        if found >= 0:
            line = self._buffer[self._pos : found]
            self._pos = found + 2
            return line
        tail = self._take_buffered(len(self._buffer))
        stream = self._stream
        if stream is None:
            raise RedisConnectionError("connection closed while reading a reply")
        try:
            data = await stream.readline()
        except BaseException:
            self.on_disconnect()  # type: ignore[no-untyped-call]
            raise
        if not data.endswith(b"\r\n"):
            self.on_disconnect()  # type: ignore[no-untyped-call]
            raise RedisConnectionError("connection closed while reading a reply")
        return (tail + data)[:-2]

    async def _discard(self, count: int) -> tuple[int, str]:
        """Consume ``count`` elements (nested arrays included); total value bytes and their SHA-256."""
        self._skipped = True
        digest = hashlib.sha256()
        total = 0
        left = count
        while left > 0:
            left -= 1
            line = await self._raw_line()
            byte, rest = line[:1], line[1:]
            if byte == b"$" and rest != b"-1":
                length = int(rest)
                await self._stream_through(length + 2, digest, length)
                total += length
            elif byte == b"*" and rest != b"-1":
                left += int(rest)
            elif byte not in (b"+", b":", b"-", b"$", b"*"):
                self.on_disconnect()  # type: ignore[no-untyped-call]
                raise InvalidResponse("Protocol Error while discarding a reply")
        return total, digest.hexdigest()


def bounded_parser(
    max_value_bytes: int, max_reply_bytes: int, max_items: int = MAX_ITEMS
) -> type[BoundedParser]:
    """A parser class with these limits, for ``parser_class=`` of a connection pool."""
    if max_reply_bytes < max_value_bytes:
        raise ValueError("max_reply_bytes must be at least max_value_bytes")
    return type(
        "BoundedParser",
        (BoundedParser,),
        {"max_value_bytes": max_value_bytes, "max_reply_bytes": max_reply_bytes, "max_items": max_items},
    )
