"""KasminaCommandIntake: adaptation commands from the bus into a training process.

Every training process must see every command (each one picks those for its
own ``training_run_id``), so the intake is a *broadcast* reader of
``oona.normal`` taking only ``ADAPTATION_COMMAND`` and ignoring the system
states and field reports that share the stream. Each command goes to
:meth:`KasminaSeedManager.handle_command`, which verifies it (signature,
command id, freshness before nonce), ignores other runs and counts
rejections; the intake only tallies the outcomes and keeps the most recent
ones for inspection. Oona has already checked the *envelope* (bus signature,
freshness, replay); Kasmina checks the command itself, so a command signed
with the wrong key inside a validly signed envelope is still refused.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from esper.core.logs import get_logger
from esper.core.untrusted import bounded
from esper.core.worker import WorkerContext
from esper.kasmina.seed_manager import CommandResult, KasminaSeedManager
from esper.leyline import leyline_pb2
from esper.oona import BroadcastReader, OonaClient, OonaMessage

_log = get_logger("esper.kasmina.intake")
_COMMAND = leyline_pb2.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
_IGNORED = (leyline_pb2.BUS_MESSAGE_TYPE_SYSTEM_STATE, leyline_pb2.BUS_MESSAGE_TYPE_FIELD_REPORT)


class KasminaCommandIntake:
    """Feeds bus commands to ``manager.handle_command``; run it as a worker (``await intake.run(ctx)``)."""

    def __init__(
        self,
        client: OonaClient,
        manager: KasminaSeedManager,
        *,
        history: int = 64,
        on_result: Callable[[leyline_pb2.AdaptationCommand, CommandResult], None] | None = None,
    ) -> None:
        self.client = client
        self.manager = manager
        self.on_result = on_result
        self.results: deque[tuple[str, CommandResult]] = deque(maxlen=max(1, history))
        self._counts: Counter[str] = Counter()
        self._reader: BroadcastReader | None = None

    async def handle(self, message: OonaMessage) -> None:
        command = message.decode(leyline_pb2.AdaptationCommand)
        result = await self.manager.handle_command(command)
        key = result.status if not result.reason else f"{result.status}.{result.reason}"
        self._counts[key] += 1
        self.results.append((command.command_id, result))
        if result.status == "rejected":
            _log.warning(
                "kasmina.command_rejected", command_id=bounded(command.command_id), reason=result.reason
            )
        if self.on_result is not None:
            self.on_result(command, result)

    async def run(self, ctx: WorkerContext) -> None:
        """Read commands until ``ctx.stopping``; started once the reader is positioned.

        A restart (a new ``run``) resumes after the last entry the previous run saw.
        """
        reader = self.client.broadcast(
            self.client.config.normal_stream,
            self.handle,
            types={_COMMAND},
            ignore_types=set(_IGNORED),
            start_id=self._reader.last_id if self._reader is not None else "$",
        )
        self._reader = reader
        await reader.run(ctx)

    def metrics_snapshot(self) -> dict[str, float]:
        """Outcomes under ``kasmina.intake.``: ``applied``, ``ignored.<reason>``, ``rejected.<reason>``."""
        snap = {f"kasmina.intake.{k}": float(v) for k, v in self._counts.items()}
        snap["kasmina.intake.total"] = float(sum(self._counts.values()))
        return snap

    def count(self, name: str) -> int:
        return self._counts[name]
