"""The other half of an epoch's end: waiting for the controller's answer to its report.

A base class of :class:`~esper.tolaria.trainer.TolariaTrainer`. Commands
(from a command intake), decisions (from a
:class:`~esper.tolaria.decisions.DecisionReader`) and settled kernel
requests (from the bus kernel coordinator) are notified here as they come,
and :meth:`ControllerAnswers.wait_for_commands` waits on those
notifications, never on a timer, until the answer is complete: the
controller has decided, its command is applied and a commanded kernel has
arrived, so a graft lands between epochs.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from esper.leyline import leyline_pb2
from esper.tolaria import packets
from esper.tolaria.decisions import ControllerDecision
from esper.tolaria.protocols import SeedManager
from esper.tolaria.records import CommandRecord


class ControllerAnswers:
    """Commands, decisions and kernel arrivals since the last state packet, and the wait on them."""

    manager: SeedManager

    def _init_answers(self) -> None:
        self._commands: list[CommandRecord] = []
        self._since_state: list[CommandRecord] = []
        self._arrived = asyncio.Event()
        #: Validation loss of the state packet awaiting the controller's answer, and that answer.
        self._awaiting_loss: float | None = None
        self._answer: ControllerDecision | None = None

    def _expect_answer(self, validation_loss: float) -> None:
        """A state packet with this validation loss is about to be published."""
        self._since_state.clear()
        self._awaiting_loss, self._answer = validation_loss, None

    def _take_answer(self) -> ControllerDecision | None:
        decision, self._awaiting_loss = self._answer, None
        return decision

    async def apply_command(self, command: leyline_pb2.AdaptationCommand) -> Any:
        """Hand ``command`` to the manager and record the outcome (use as an intake's handler)."""
        result = await self.manager.handle_command(command)
        self.notify_command(command, result)
        return result

    def notify_command(self, command: leyline_pb2.AdaptationCommand, result: Any = None) -> None:
        """Record a command some other component applied with ``manager.handle_command``.

        Wakes :meth:`wait_for_commands`. ``result`` is Kasmina's
        ``CommandResult`` (``status``/``reason``) or ``None``.
        """
        record = packets.command_record(command, result)
        self._commands.append(record)
        self._since_state.append(record)
        self._arrived.set()

    def notify_decision(self, decision: ControllerDecision) -> None:
        """Record the controller's decision on a state packet (a :class:`DecisionReader` calls this).

        A decision on the packet being waited for (matched by its validation
        loss) ends :meth:`wait_for_commands` early when it issued no command.
        """
        awaiting = self._awaiting_loss
        if awaiting is not None and math.isclose(decision.validation_loss, awaiting, rel_tol=1e-6):
            self._answer = decision
            self._arrived.set()

    def notify_kernel(self, seed_id: str = "") -> None:
        """A kernel request was settled (the bus coordinator's ``on_kernel``): wakes the wait."""
        self._arrived.set()

    def _answered(self, count: int) -> bool:
        if self.manager.awaiting_kernels():
            return False
        if len(self._since_state) >= count:
            return True
        answer = self._answer
        return answer is not None and (not answer.command_issued or bool(self._since_state))

    async def wait_for_commands(self, timeout_s: float, count: int = 1) -> list[CommandRecord]:
        """Wait until ``count`` commands were applied since the last state packet, or ``timeout_s``.

        Also returns as soon as the controller's decision on that packet is
        known and its command (if it issued one) applied; either way, not
        while a seed still waits for its kernel, so a commanded graft lands
        before the next epoch. Event driven (no polling); returns the
        commands seen since that packet.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while not self._answered(count):
            self._arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return list(self._since_state)
