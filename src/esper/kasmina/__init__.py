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

Importing the package does not import torch: lifecycle, gates, alpha
schedules and command verification are plain Python, and
:class:`esper.kasmina.warmer.KernelWarmer` (the control plane's part) only
verifies artifacts. The names that touch a model (slots, the seed manager,
kernel providers and caches, the bus coordinator and intake) are loaded on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esper.core.lazy import lazy_exports
from esper.kasmina.blending import AlphaSchedule
from esper.kasmina.gates import GateInputs, GateResult, evaluate_gate
from esper.kasmina.lifecycle import ALLOWED_TRANSITIONS, IllegalTransition, SeedLifecycle
from esper.kasmina.verification import CommandVerifier, NonceLedger

if TYPE_CHECKING:
    from esper.kasmina.context import SeedContext
    from esper.kasmina.intake import KasminaCommandIntake
    from esper.kasmina.isolation import IsolationReport
    from esper.kasmina.kernel_cache import KernelCache
    from esper.kasmina.prefetch import KasminaPrefetchCoordinator, OutstandingRequest
    from esper.kasmina.providers import BlueprintRuntime, KernelProvider, KernelSink, LocalKernelProvider
    from esper.kasmina.seed_manager import CommandResult, KasminaSeedManager
    from esper.kasmina.slot import SeedSlot, add_seed_slots

#: Public names that need torch (seed slots live in a trainer's model), and their modules.
_TORCH_BACKED = {
    "SeedContext": "esper.kasmina.context",
    "KasminaCommandIntake": "esper.kasmina.intake",
    "IsolationReport": "esper.kasmina.isolation",
    "KernelCache": "esper.kasmina.kernel_cache",
    "KasminaPrefetchCoordinator": "esper.kasmina.prefetch",
    "OutstandingRequest": "esper.kasmina.prefetch",
    "BlueprintRuntime": "esper.kasmina.providers",
    "KernelProvider": "esper.kasmina.providers",
    "KernelSink": "esper.kasmina.providers",
    "LocalKernelProvider": "esper.kasmina.providers",
    "CommandResult": "esper.kasmina.seed_manager",
    "KasminaSeedManager": "esper.kasmina.seed_manager",
    "SeedSlot": "esper.kasmina.slot",
    "add_seed_slots": "esper.kasmina.slot",
}


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

__getattr__, __dir__ = lazy_exports(__name__, _TORCH_BACKED, __all__)
