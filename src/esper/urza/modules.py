"""Kernel artifacts <-> PyTorch modules: encode a kernel, rebuild and load one.

The torch half of the artifact format (:mod:`esper.urza.artifact` is the
torch-free half and says what the bytes mean). Processes that build or run
kernels - Tezzeret compiling them, trainers attaching them, ``UrzaLibrary``
``load`` / ``save`` - come through here; the control plane only verifies
artifacts and never imports this module.

Nothing is unpickled: tensors are decoded from safetensors (plain data) and
copied with ``load_state_dict(strict=True)`` into a module freshly built
from its family, after their names, shapes and dtypes were checked against
that module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from esper.urza import artifact as fmt
from esper.urza.errors import CorruptArtifact
from esper.urza.families import FAMILIES, construct


def serialize(
    module: nn.Module,
    *,
    blueprint_id: str,
    family: str,
    family_args: Mapping[str, int | float | str],
    parameters: Mapping[str, float],
    d: int,
    dtype: str,
) -> tuple[bytes, fmt.Manifest]:
    """Encode a module's state dict and manifest as ``esper-kernel/1`` bytes."""
    tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    bare = st_save(tensors)
    torch_version = torch.__version__
    params = {k: float(v) for k, v in sorted(parameters.items())}
    manifest = fmt.Manifest(
        blueprint_id=blueprint_id,
        family=family,
        family_args=dict(family_args),
        parameters=params,
        d=int(d),
        dtype=dtype,
        torch_version=torch_version,
        guard_digest=fmt.compute_guard_digest(blueprint_id, params, d, dtype, torch_version),
        tensors_sha256=fmt.sha256_hex(fmt.data_section(bare)),
    )
    blob = st_save(tensors, metadata={"esper_manifest": manifest.to_json()})
    if fmt.data_section(blob) != fmt.data_section(bare):  # pragma: no cover - safetensors layout guarantee
        raise RuntimeError("safetensors data section changed with metadata")
    return blob, manifest


def decode_tensors(blob: bytes, *, source: str = "artifact") -> dict[str, torch.Tensor]:
    """Decode the tensors of a blob that passed :func:`esper.urza.artifact.verify_contents`."""
    try:
        return st_load(blob)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CorruptArtifact(f"{source} tensors are unreadable: {exc}") from None


def build_empty(manifest: fmt.Manifest, *, source: str = "artifact") -> nn.Module:
    """Build the family's module (initial weights are overwritten by the load)."""
    if manifest.family not in FAMILIES:
        raise CorruptArtifact(f"{source} names unknown family {manifest.family!r}")
    try:
        return construct(manifest.family, manifest.family_args, manifest.d, manifest.dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CorruptArtifact(f"{source} family arguments are invalid: {exc}") from None


def instantiate(
    manifest: fmt.Manifest, tensors: Mapping[str, torch.Tensor], *, source: str = "artifact"
) -> nn.Module:
    """A fresh module built from its family, holding private copies of ``tensors``.

    Names, shapes and dtypes are checked against the family before
    ``load_state_dict(strict=True)`` copies the values in.
    """
    module = build_empty(manifest, source=source)
    expected = module.state_dict()
    if set(expected) != set(tensors):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise CorruptArtifact(
            f"{source} tensors do not fit family {manifest.family}: missing {missing}, unexpected {extra}"
        )
    for key, ref in expected.items():
        got = tensors[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CorruptArtifact(
                f"{source} tensor {key!r} is {tuple(got.shape)}/{got.dtype},"
                f" family expects {tuple(ref.shape)}/{ref.dtype}"
            )
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # pragma: no cover - pre-checked above
        raise CorruptArtifact(f"{source} tensors do not load: {exc}") from None
    return module


def load_bytes(
    blob: bytes,
    *,
    expected_checksum: str | None = None,
    expected_guard: str | None = None,
    source: str = "artifact",
    blueprint_id: str | None = None,
) -> tuple[nn.Module, fmt.Manifest]:
    """Verify and load an artifact from bytes: checksum first, then contents, then the module."""
    if expected_checksum is not None:
        fmt.check_checksum(blob, expected_checksum, source=source, blueprint_id=blueprint_id)
    manifest = fmt.verify_contents(
        blob, expected_guard=expected_guard, blueprint_id=blueprint_id, source=source
    )
    return instantiate(manifest, decode_tensors(blob, source=source), source=source), manifest
