"""Tezzeret compiler: blueprint + parameters + slot width → verified kernel artifact.

Each compile

1. validates the request with Karn (unknown id, missing / out-of-bounds /
   unknown parameters are rejected; no parameters → the bound midpoints);
2. builds the module from its family (:func:`esper.tezzeret.kernels.build_kernel`,
   seeded, so the same request always gives the same weights and bytes);
3. checks a training-mode forward on ``[batch, d]`` gives ``[batch, d]``, that
   the output is finite, and that a backward pass gives finite gradients;
4. writes the ``esper-kernel/1`` artifact atomically (see
   :mod:`esper.urza.artifact`) and records ``compile_ms`` (build + checks +
   serialisation + write);
5. prewarms: ``prewarm_iterations`` eval-mode forwards under
   ``torch.inference_mode``, each timed (p50 / p95 reported).

The result carries a Leyline ``KernelCatalogUpdate`` (``prewarm_ms`` = p50).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from esper.karn import KarnCatalog
from esper.leyline import leyline_pb2
from esper.tezzeret.kernels import build_kernel, family_for
from esper.urza import artifact as fmt
from esper.urza.families import dtype_of
from esper.urza.modules import serialize
from esper.urza.records import percentile

P = ParamSpec("P")
R = TypeVar("R")


def _off_loop(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """The async twin of a blocking method: same signature, run in a worker thread.

    Compiling is CPU-bound (build, checks, prewarm), so callers on an event
    loop use the twin; deriving it keeps the two signatures from drifting.
    """

    @functools.wraps(fn)
    async def off_loop(*args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    off_loop.__name__ = off_loop.__qualname__ = f"a{fn.__name__}"
    off_loop.__doc__ = f"``{fn.__name__}`` run off the event loop (in a worker thread)."
    return off_loop


class CompileError(RuntimeError):
    """The kernel failed a compile-time check (shape, finiteness, backward)."""

    def __init__(self, blueprint_id: str, reason: str, detail: str) -> None:
        super().__init__(f"{blueprint_id}: {reason}: {detail}")
        self.blueprint_id = blueprint_id
        self.reason = reason


@dataclass(frozen=True)
class CompileResult:
    blueprint_id: str
    parameters: dict[str, float]
    family: str
    family_args: dict[str, int | float | str]
    d: int
    dtype: str
    artifact_path: Path
    checksum: str
    guard_digest: str
    compile_ms: float
    prewarm_samples_ms: tuple[float, ...]
    file_size: int

    @property
    def artifact_ref(self) -> str:
        return fmt.artifact_ref(self.blueprint_id, self.checksum)

    @property
    def prewarm_p50_ms(self) -> float:
        return percentile(self.prewarm_samples_ms, 50)

    @property
    def prewarm_p95_ms(self) -> float:
        return percentile(self.prewarm_samples_ms, 95)

    @property
    def catalog_update(self) -> leyline_pb2.KernelCatalogUpdate:
        """A fresh KernelCatalogUpdate (``prewarm_ms`` is the p50 of the prewarm samples)."""
        return leyline_pb2.KernelCatalogUpdate(
            blueprint_id=self.blueprint_id,
            artifact_ref=self.artifact_ref,
            checksum=self.checksum,
            guard_digest=self.guard_digest,
            compile_ms=self.compile_ms,
            prewarm_ms=self.prewarm_p50_ms,
        )


class TezzeretCompiler:
    """Compiles blueprints into artifacts under ``artifact_dir`` (normally Urza's artifact dir)."""

    def __init__(
        self,
        artifact_dir: str | os.PathLike[str],
        *,
        catalog: KarnCatalog | None = None,
        prewarm_iterations: int = 10,
        validation_batch: int = 4,
    ) -> None:
        self.artifact_dir = Path(artifact_dir).expanduser().resolve()
        self.catalog = catalog if catalog is not None else KarnCatalog()
        self.prewarm_iterations = max(1, int(prewarm_iterations))
        self.validation_batch = max(2, int(validation_batch))

    def compile(
        self,
        blueprint_id: str,
        parameters: Mapping[str, float] | None = None,
        *,
        d: int,
        dtype: str = "float32",
    ) -> CompileResult:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"slot width d must be a positive integer, got {d!r}")
        torch_dtype = dtype_of(dtype)
        if parameters is None:
            parameters = self.catalog.default_parameters(blueprint_id)
        params = self.catalog.validate_request(blueprint_id, parameters)
        started = time.perf_counter()
        family, args = family_for(blueprint_id, params)
        module = build_kernel(blueprint_id, params, d, dtype)
        blob, manifest = serialize(
            module,
            blueprint_id=blueprint_id,
            family=family,
            family_args=args,
            parameters=params,
            d=d,
            dtype=dtype,
        )  # pristine weights, captured before the checks touch any running statistics
        self._check(blueprint_id, module, d, torch_dtype)
        checksum = fmt.sha256_hex(blob)
        path = self.artifact_dir / fmt.relative_path(blueprint_id, checksum)
        fmt.write_atomic(path, blob)
        compile_ms = (time.perf_counter() - started) * 1000.0
        samples = self._prewarm(module, d, torch_dtype)
        return CompileResult(
            blueprint_id=blueprint_id,
            parameters=params,
            family=family,
            family_args=args,
            d=d,
            dtype=dtype,
            artifact_path=path,
            checksum=checksum,
            guard_digest=manifest.guard_digest,
            compile_ms=compile_ms,
            prewarm_samples_ms=tuple(samples),
            file_size=len(blob),
        )

    acompile = _off_loop(compile)

    def _check(self, bid: str, module: torch.nn.Module, d: int, dtype: torch.dtype) -> None:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(self.validation_batch, d, generator=generator).to(dtype).requires_grad_(True)
        module.train()
        try:
            out = module(x)
        except Exception as exc:
            raise CompileError(bid, "forward_failed", repr(exc)) from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (self.validation_batch, d):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            expected = (self.validation_batch, d)
            raise CompileError(bid, "shape_mismatch", f"output {shape}, expected {expected}")
        if out.dtype != dtype:
            raise CompileError(bid, "dtype_mismatch", f"output {out.dtype}, expected {dtype}")
        if not torch.isfinite(out).all():
            raise CompileError(bid, "non_finite_output", "forward produced NaN/Inf")
        try:
            loss: torch.Tensor = out.float().square().mean()
            torch.autograd.backward(loss)
        except Exception as exc:
            raise CompileError(bid, "backward_failed", repr(exc)) from exc
        grads = [x.grad] + [p.grad for p in module.parameters() if p.requires_grad]
        if x.grad is None:
            raise CompileError(bid, "no_input_gradient", "output does not depend on the input")
        if any(g is not None and not torch.isfinite(g).all() for g in grads):
            raise CompileError(bid, "non_finite_gradient", "backward produced NaN/Inf")
        module.zero_grad(set_to_none=True)

    def _prewarm(self, module: torch.nn.Module, d: int, dtype: torch.dtype) -> list[float]:
        module.eval()
        x = torch.randn(self.validation_batch, d, generator=torch.Generator().manual_seed(1)).to(dtype)
        samples: list[float] = []
        with torch.inference_mode():
            for _ in range(self.prewarm_iterations):
                t0 = time.perf_counter()
                module(x)
                samples.append((time.perf_counter() - t0) * 1000.0)
        return [s if math.isfinite(s) else 0.0 for s in samples]
