"""How Kasmina obtains kernels: an asynchronous request, answered later.

GERMINATE only *asks* for a kernel (:meth:`KernelProvider.request`); the
answer arrives through the manager's :class:`KernelSink` methods
(``attach_kernel`` or ``kernel_failed``), possibly much later, which is how a
bus round trip behaves. The seed waits in GERMINATED meanwhile, guarded by the
manager's prefetch timeout (``expire_pending``), so a lost request can no
longer strand it.

:class:`LocalKernelProvider` answers synchronously from an in-process
``BlueprintRuntime`` (``fetch_kernel(id) -> (module, latency_ms)``): tests and
local training use it; the bus-facing coordinator implements the same protocol.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class BlueprintRuntime(Protocol):
    """Anything that can build a kernel in-process (e.g. Urza's runtime)."""

    def fetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]: ...


class KernelSink(Protocol):
    """Where a provider delivers its answer (the seed manager)."""

    async def attach_kernel(
        self, seed_id: str, blueprint_id: str, module: nn.Module, latency_ms: float, source: str = "bus"
    ) -> bool: ...

    async def kernel_failed(self, seed_id: str, blueprint_id: str, reason: str) -> bool: ...


class KernelProvider(Protocol):
    """Starts fetching a kernel; must not block and must not raise for a fetch failure.

    Report the outcome later through the sink; raising from ``request`` is
    treated as an immediate failure of the request.
    """

    async def request(self, seed_id: str, blueprint_id: str, training_run_id: str) -> None: ...


class LocalKernelProvider:
    """Builds the kernel in-process and answers the sink immediately.

    ``latency_ms`` is the runtime's own figure when it reports one (> 0),
    otherwise the measured wall time of ``fetch_kernel``. Keep runtimes used
    here small and fast: this runs on the caller's thread.
    """

    def __init__(self, runtime: BlueprintRuntime, sink: KernelSink) -> None:
        self.runtime = runtime
        self.sink = sink
        self.requests = 0

    async def request(self, seed_id: str, blueprint_id: str, training_run_id: str) -> None:
        self.requests += 1
        started = time.perf_counter()
        try:
            module, reported_ms = self.runtime.fetch_kernel(blueprint_id)
        except Exception as exc:  # noqa: BLE001 - any runtime failure is a fetch failure
            await self.sink.kernel_failed(seed_id, blueprint_id, f"fetch_error: {type(exc).__name__}: {exc}")
            return
        measured_ms = (time.perf_counter() - started) * 1000.0
        latency = reported_ms if reported_ms and reported_ms > 0 else measured_ms
        await self.sink.attach_kernel(seed_id, blueprint_id, module, latency, source="runtime")
