"""Kernel acquisition: request, attach, fail, time out, fall back.

GERMINATE asks the injected provider and leaves the seed in GERMINATED;
the answer comes back through :meth:`KernelAcquisition.attach_kernel` or
:meth:`KernelAcquisition.kernel_failed`. The manager enforces what a provider
cannot: the latency budget, the kernel breaker, the prefetch timeout (retry
once, then fall back) and the fallback chain (``BP001`` then
``nn.Identity()``), each explained by a ``fallback_applied`` event.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from esper.kasmina.context import PendingKernel, SeedContext
from esper.kasmina.core import _L, INFO, WARNING, Level, SeedManagerCore, _probe_interface
from esper.kasmina.gates import GateInputs, evaluate_gate


class KernelAcquisition(SeedManagerCore):
    """Adds germination and the kernel request/answer protocol to the core."""

    def _housekeeping(self, now: float) -> None:
        for ctx in list(self._seeds.values()):
            if ctx.stage == _L.SEED_STAGE_EMBARGOED and now >= ctx.embargo_until:
                self._reset(ctx)
        self._expire(now, can_send=False)

    # ------------------------------------------------------- kernel acquisition
    def _slot_for(self, seed_id: str) -> str:
        """The slot a seed grafts into when the command names none.

        A seed id that names a slot (or a seed that already had one) keeps it.
        Otherwise the seed takes the first free slot in registration order, so
        a controller that only numbers its seeds (``seed-1``, ``seed-2``, ...)
        can grow any model without knowing its layer names.
        """
        if self._host is None or seed_id in self._slots:
            return seed_id
        existing = self._seeds.get(seed_id)
        if existing is not None and existing.slot_name:
            return existing.slot_name
        for name in self._slots:
            if not self._resolve_slot(name, seed_id):
                return name
        return seed_id

    def free_slot_count(self) -> int:
        """Slots of the registered host that could take a new seed now (0 without a host)."""
        return sum(1 for name in self._slots if not self._resolve_slot(name, ""))

    def _resolve_slot(self, ctx_slot: str, seed_id: str) -> str:
        """A rejection reason when the slot cannot take a new seed, else ''."""
        if self._host is None:
            return ""
        if ctx_slot not in self._slots:
            return "unknown_slot"
        for other in self._seeds.values():
            if (
                other.seed_id != seed_id
                and other.slot_name == ctx_slot
                and other.stage
                not in (
                    _L.SEED_STAGE_DORMANT,
                    _L.SEED_STAGE_EMBARGOED,
                    _L.SEED_STAGE_RESETTING,
                    _L.SEED_STAGE_TERMINATED,
                )
            ):
                return "slot_occupied"
        return ""

    async def germinate(
        self,
        seed_id: str,
        blueprint_id: str,
        *,
        slot: str | None = None,
        parameters: Mapping[str, float] | None = None,
        training_run_id: str = "",
        command_id: str = "",
    ) -> str:
        """Graft ``blueprint_id`` into a seed; returns '' or the rejection reason (also reported)."""
        self._housekeeping(self._clock())
        slot = slot or self._slot_for(seed_id)
        reason = self._check_germinate(seed_id, blueprint_id, slot, parameters or {})
        if reason:
            self.record_rejection(reason, command_id, seed_id=seed_id, blueprint_id=blueprint_id)
            return reason
        ctx = self._seeds.get(seed_id) or self._new_context(seed_id)
        self._seeds[seed_id] = ctx
        ctx.blueprint_id = blueprint_id
        ctx.slot_name = slot
        ctx.parameters = dict(parameters or {})
        ctx.training_run_id = training_run_id or self.training_run_id or "prototype"
        ctx.germinated_epoch = self._epoch
        ctx.last_failure = ""
        ctx.last_gate_results.clear()
        ctx.latency_ms = 0.0
        self._transition(ctx, _L.SEED_STAGE_GERMINATED)
        self.emit("seed_germinated", INFO, seed_id=seed_id, blueprint_id=blueprint_id, slot=ctx.slot_name)
        await self._acquire(ctx)
        return ""

    def _check_germinate(
        self, seed_id: str, blueprint_id: str, slot: str, params: Mapping[str, float]
    ) -> str:
        if not seed_id:
            return "missing_seed_id"
        existing = self._seeds.get(seed_id)
        if existing is not None:
            if existing.stage in (_L.SEED_STAGE_EMBARGOED, _L.SEED_STAGE_CULLED, _L.SEED_STAGE_RESETTING):
                return "seed_embargoed"
            if existing.stage != _L.SEED_STAGE_DORMANT:
                return "seed_exists"
        g0 = evaluate_gate(_L.SEED_GATE_G0_SANITY, GateInputs(seed_id, blueprint_id, dict(params)))
        if not g0.passed:
            return "g0_sanity_failed"
        if self.blueprint_lookup is not None and not self.blueprint_lookup(blueprint_id):
            return "unknown_blueprint"
        return self._resolve_slot(slot, seed_id)

    async def _acquire(self, ctx: SeedContext) -> None:
        cached = self.kernel_cache.get(ctx.blueprint_id)
        if cached is not None:
            self._install(ctx, cached, 0.0, "cache")
            return
        if not self.breaker.allow():
            self.emit("breaker_denied", WARNING, seed_id=ctx.seed_id, blueprint_id=ctx.blueprint_id)
            self._fallback(ctx, "breaker_open")
            return
        if self.kernel_provider is None:
            self._fallback(ctx, "no_kernel_provider")
            return
        ctx.pending = PendingKernel(ctx.blueprint_id, self._clock() + self.prefetch_timeout_seconds)
        await self._send_request(ctx)

    async def _send_request(self, ctx: SeedContext) -> None:
        pending, provider = ctx.pending, self.kernel_provider
        if pending is None:
            return
        if provider is None:
            await self.kernel_failed(ctx.seed_id, pending.blueprint_id, "no_kernel_provider")
            return
        pending.retry_due = False
        self._emit_attempt("kernel_requested", INFO, ctx, pending)
        try:
            await provider.request(ctx.seed_id, pending.blueprint_id, ctx.training_run_id)
        except Exception as exc:  # noqa: BLE001 - a provider crash is a failed request, never a crash here
            await self.kernel_failed(
                ctx.seed_id, pending.blueprint_id, f"request_error: {type(exc).__name__}"
            )

    def _emit_attempt(self, description: str, level: Level, ctx: SeedContext, pending: PendingKernel) -> None:
        """An event about one attempt of a kernel request (sent, timed out)."""
        self.emit(
            description,
            level,
            seed_id=ctx.seed_id,
            blueprint_id=pending.blueprint_id,
            attempt=pending.attempts,
        )

    def _pending_for(self, seed_id: str, blueprint_id: str, source: str) -> SeedContext | None:
        ctx = self._seeds.get(seed_id)
        if (
            ctx is None
            or ctx.pending is None
            or ctx.pending.blueprint_id != blueprint_id
            or ctx.stage != _L.SEED_STAGE_GERMINATED
        ):
            self.emit(
                "kernel_ignored",
                INFO,
                seed_id=seed_id,
                blueprint_id=blueprint_id,
                source=source,
                reason="not_pending",
            )
            return None
        return ctx

    async def attach_kernel(
        self, seed_id: str, blueprint_id: str, module: nn.Module, latency_ms: float, source: str = "bus"
    ) -> bool:
        """Deliver a requested kernel; True when *this* module was grafted.

        ``latency_ms`` is the time to materialise the module locally (load),
        not the bus round trip (that is bounded by the prefetch timeout).
        Over the budget, the breaker records a failure and the fallback is
        grafted instead. Late or unsolicited deliveries are ignored.
        """
        ctx = self._pending_for(seed_id, blueprint_id, source)
        if ctx is None:
            return False
        ctx.pending = None
        self.last_fetch_latency_ms = latency_ms
        if latency_ms > self.latency_budget_ms:
            self._breaker_record(False, "latency_budget_exceeded")
            self.emit(
                "latency_budget_exceeded",
                WARNING,
                seed_id=seed_id,
                blueprint_id=blueprint_id,
                latency_ms=f"{latency_ms:.2f}",
                budget_ms=f"{self.latency_budget_ms:.2f}",
            )
            self._fallback(ctx, "latency_budget_exceeded", latency_ms)
            return False
        self._breaker_record(True, "kernel_ready")
        self.kernel_cache.put(blueprint_id, module)
        self._install(ctx, module, latency_ms, source)
        return ctx.kernel is not None

    async def kernel_failed(self, seed_id: str, blueprint_id: str, reason: str) -> bool:
        """A provider could not produce the kernel: count it and graft the fallback."""
        ctx = self._pending_for(seed_id, blueprint_id, "error")
        if ctx is None:
            return False
        ctx.pending = None
        self._breaker_record(False, "fetch_error")
        self.emit("kernel_failed", WARNING, seed_id=seed_id, blueprint_id=blueprint_id, reason=reason)
        self._fallback(ctx, f"provider_error: {reason}")
        return True

    async def expire_pending(self, now: float | None = None) -> int:
        """Time out overdue kernel requests: retry once, then fall back. Returns how many expired."""
        expired = self._expire(self._clock() if now is None else now, can_send=True)
        await self._flush_retries()
        return expired

    def _expire(self, now: float, *, can_send: bool) -> int:
        expired = 0
        for ctx in list(self._seeds.values()):
            pending = ctx.pending
            if pending is None or now < pending.deadline:
                continue
            expired += 1
            self._breaker_record(False, "prefetch_timeout")
            self._emit_attempt("prefetch_timeout", WARNING, ctx, pending)
            if pending.attempts <= self.prefetch_retries:
                pending.attempts += 1
                pending.deadline = now + self.prefetch_timeout_seconds
                pending.retry_due = True
            else:
                ctx.pending = None
                self._fallback(ctx, "prefetch_timeout")
        # Retries found by the synchronous path (``step()``) are sent by the next
        # ``expire_pending()`` or command, both awaited by their owners; a
        # retry never runs as an unowned background task.
        return expired

    async def _flush_retries(self) -> None:
        for ctx in list(self._seeds.values()):
            if ctx.pending is not None and ctx.pending.retry_due:
                await self._send_request(ctx)

    def _breaker_record(self, success: bool, reason: str) -> None:
        before = self.breaker.state
        if success:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()
        after = self.breaker.state
        if after != before:
            level = WARNING if after == _L.CIRCUIT_STATE_OPEN else INFO
            self.emit(
                "breaker_event",
                level,
                seed_id="kasmina",
                reason=reason,
                **{"from": _L.CircuitBreakerState.Name(before), "to": _L.CircuitBreakerState.Name(after)},
            )

    def _fallback(self, ctx: SeedContext, reason: str, latency_ms: float = 0.0) -> None:
        """Graft the fallback blueprint, else ``nn.Identity()``, explaining why."""
        module: nn.Module | None = None
        chosen = "identity"
        why = reason
        fb = self.fallback_blueprint_id
        if fb and fb != ctx.blueprint_id:
            module = self.kernel_cache.get(fb)
            if module is None and self.runtime is not None:
                try:
                    module, _ = self.runtime.fetch_kernel(fb)
                    self.kernel_cache.put(fb, module)
                except Exception as exc:  # noqa: BLE001 - the fallback failing means identity, not a crash
                    why = f"{reason}; fallback {fb} failed: {type(exc).__name__}"
                    module = None
            elif module is None:
                why = f"{reason}; fallback {fb} unavailable"
            if module is not None:
                chosen = fb
        self.emit(
            "fallback_applied",
            WARNING,
            seed_id=ctx.seed_id,
            blueprint_id=ctx.blueprint_id,
            fallback=chosen,
            reason=why,
        )
        ctx.fallback_reason = why
        self._install(ctx, module if module is not None else nn.Identity(), latency_ms, "fallback")
        ctx.used_fallback = True

    def _install(self, ctx: SeedContext, module: nn.Module, latency_ms: float, source: str) -> None:
        """Bind ``module`` to the seed and its slot, check it, then G1 -> TRAINING."""
        ctx.kernel = module
        ctx.kernel_source = source
        ctx.used_fallback = False
        ctx.latency_ms = latency_ms
        slot = self._slots.get(ctx.slot_name)
        if slot is not None:
            slot.attach(module)
            ctx.kernel = slot.kernel
            ctx.interface_ok = _probe_interface(module, slot.dim)
        self._set_alpha(ctx, 0.0)
        ctx.alpha_steps = 0
        self.emit(
            "kernel_attached",
            INFO,
            seed_id=ctx.seed_id,
            blueprint_id=ctx.blueprint_id,
            source=source,
            latency_ms=f"{latency_ms:.2f}",
        )
        if slot is not None and not ctx.interface_ok:
            self._fail(ctx, "G3_INTERFACE", "kernel interface check failed")
            return
        if not self.verify_isolation(ctx.seed_id).isolated:
            return
        self._advance(ctx, _L.SEED_GATE_G1_GRADIENT_HEALTH, _L.SEED_STAGE_TRAINING)
