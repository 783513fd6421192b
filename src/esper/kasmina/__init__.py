"""Kasmina: seed slots in a host model, their lifecycle, kernels and isolation.

Public API::

    slots = add_seed_slots(model, {"encoder.2": 64})
    manager = KasminaSeedManager(runtime=local_runtime, keys=key_ring, training_run_id="run-1")
    manager.register_host_model(model)
    await manager.handle_command(signed_germinate_command)
    for batch in data:
        ...; loss.backward(); optimizer.step(); manager.step()

The bus-facing :class:`KasminaPrefetchCoordinator` implements
:class:`KernelProvider` and answers through ``attach_kernel`` /
``kernel_failed``; :class:`KasminaCommandIntake` feeds bus commands to
``handle_command``.
"""

from esper.kasmina.blending import AlphaSchedule
from esper.kasmina.context import SeedContext
from esper.kasmina.gates import GateInputs, GateResult, evaluate_gate
from esper.kasmina.intake import KasminaCommandIntake
from esper.kasmina.isolation import IsolationReport
from esper.kasmina.kernel_cache import KernelCache
from esper.kasmina.lifecycle import ALLOWED_TRANSITIONS, IllegalTransition, SeedLifecycle
from esper.kasmina.prefetch import KasminaPrefetchCoordinator, OutstandingRequest
from esper.kasmina.providers import BlueprintRuntime, KernelProvider, KernelSink, LocalKernelProvider
from esper.kasmina.seed_manager import CommandResult, KasminaSeedManager
from esper.kasmina.slot import SeedSlot, add_seed_slots
from esper.kasmina.verification import CommandVerifier, NonceLedger

__all__ = [
    "ALLOWED_TRANSITIONS",
    "AlphaSchedule",
    "BlueprintRuntime",
    "CommandResult",
    "CommandVerifier",
    "GateInputs",
    "GateResult",
    "IllegalTransition",
    "IsolationReport",
    "KasminaCommandIntake",
    "KasminaPrefetchCoordinator",
    "KasminaSeedManager",
    "KernelCache",
    "KernelProvider",
    "KernelSink",
    "LocalKernelProvider",
    "NonceLedger",
    "OutstandingRequest",
    "SeedContext",
    "SeedLifecycle",
    "SeedSlot",
    "add_seed_slots",
    "evaluate_gate",
]
