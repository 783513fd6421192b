"""Tezzeret: compiles Karn blueprints into real, verified PyTorch kernels and forges the catalogue."""

from esper.tezzeret.compiler import CompileError, CompileResult, TezzeretCompiler
from esper.tezzeret.forge import ForgeProgress, ForgeReport, TezzeretForge, run_forge
from esper.tezzeret.kernels import BLUEPRINT_FAMILIES, NoKernelFamily, build_kernel, family_for

__all__ = [
    "BLUEPRINT_FAMILIES",
    "CompileError",
    "CompileResult",
    "ForgeProgress",
    "ForgeReport",
    "NoKernelFamily",
    "TezzeretCompiler",
    "TezzeretForge",
    "build_kernel",
    "family_for",
    "run_forge",
]
