"""``BroadcastConsumer``: a reader that sees every entry, for when every process must.

E.g. training processes each waiting for the ``KernelArtifactReady`` of their
own request id. It reads with XREAD from the last id it saw, runs the same
verification as the group reader (replay keys are per consumer name), never
acks and never dead-letters: the group consumers of the stream own those
duties. Refusals and handler failures are counted and logged, nothing more.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Unpack

from redis.exceptions import ResponseError

from esper.core.logs import get_logger
from esper.oona.consumer_loop import TRANSIENT, ConsumerLoop, Entry, ReadOptions
from esper.oona.messages import Handler, RejectMessage, RejectReason

if TYPE_CHECKING:
    from esper.oona.client import OonaClient

_log = get_logger("esper.oona.consumer")


class BroadcastOptions(ReadOptions, total=False):
    """``ReadOptions`` plus the broadcast reader's own (``batch`` defaults to 64)."""

    #: First id to read after; ``"$"`` (the default) means "from now on".
    start_id: str


_OPTION_NAMES = BroadcastOptions.__required_keys__ | BroadcastOptions.__optional_keys__


class BroadcastConsumer(ConsumerLoop):
    """Sees every entry of ``stream`` from ``start_id`` on. See the module docstring.

    ``start_id`` ``"$"`` is resolved to the stream's last id when ``run``
    starts; ``ready`` is set then, so await ``ready.wait()`` before
    publishing a request whose answer you must not miss.
    """

    DEFAULT_BATCH = 64

    def __init__(
        self, client: OonaClient, stream: str, handler: Handler, **options: Unpack[BroadcastOptions]
    ) -> None:
        super().__init__(client, stream, handler, options, _OPTION_NAMES)
        self.last_id = options.get("start_id", "$")
        self.name = client.config.consumer
        self.ready = asyncio.Event()

    async def _prepare(self) -> None:
        while self.last_id == "$":
            try:
                info = await self.client.redis.xinfo_stream(self.stream)
                last: Any = info.get("last-generated-id") or b"0-0"
                self.last_id = last.decode() if isinstance(last, bytes) else str(last)
            except ResponseError:
                self.last_id = "0-0"  # stream does not exist yet: everything is new
            except TRANSIENT as exc:
                await self._on_transient(exc)
        self.ready.set()

    async def _iterate(self) -> None:
        await self._read_and_process(
            lambda: self.client.redis.xread(
                {self.stream: self.last_id}, count=self.batch, block=self.block_ms
            )
        )

    async def _process(self, entries: list[Entry]) -> None:
        metrics = self.client.metrics
        accepted, ignored, rejections = self._sort(entries)
        for (entry_id, _fields), why in rejections:
            metrics.on_rejected(self.stream, why.reason.value)
            _log.warning(
                "oona.broadcast_rejected",
                stream=self.stream,
                entry_id=entry_id,
                reason=why.reason.value,
                detail=why.detail,
            )
        if ignored:
            metrics.on_ignored(self.stream, len(ignored))
        for item, fresh in await self._check_replays(accepted, f"bcast:{self.name}"):
            message = item.message
            if not fresh:
                metrics.on_rejected(self.stream, RejectReason.REPLAY.value)
                continue
            outcome = await self._call_handler(message)
            if isinstance(outcome, RejectMessage):
                metrics.on_rejected(self.stream, outcome.reason)
                _log.warning(
                    "oona.broadcast_handler_rejected",
                    stream=self.stream,
                    entry_id=message.entry_id,
                    reason=outcome.reason,
                    detail=outcome.detail[:200],
                )
            elif outcome is not None:  # no group holds it to retry: counted and logged
                metrics.on_rejected(self.stream, RejectReason.HANDLER_FAILED.value)
                _log.warning(
                    "oona.broadcast_handler_failed",
                    stream=self.stream,
                    entry_id=message.entry_id,
                    error=type(outcome).__name__,
                )
        if entries:
            self.last_id = entries[-1][0]
