"""The kernel artifact format (``esper-kernel/1``) and its integrity checks.

On disk
-------
One file per artifact: a standard **safetensors** file (8-byte little-endian
header length, JSON header, raw tensor data) holding the module's state dict.
The header's ``__metadata__`` has one key, ``esper_manifest``, whose value is
a JSON object::

    {"format": "esper-kernel/1", "blueprint_id": "BP009", "family": "residual_mlp",
     "family_args": {"depth": 2}, "parameters": {"depth": 2.5}, "d": 32,
     "dtype": "float32", "torch_version": "2.13.0+cpu",
     "guard_digest": "<sha256 hex>", "tensors_sha256": "<sha256 hex of the data section>"}

Files live at ``<URZA_ARTIFACT_DIR>/<blueprint_id>/<checksum[:16]>.safetensors``
where ``checksum`` is the SHA-256 of the whole file (content addressed: a
recompile that produces the same bytes lands on the same path). The portable
reference carried on the bus is ``urza://<blueprint_id>/<checksum[:16]>``,
resolvable by any process sharing the artifact directory; a relative path
(``BP009/<checksum[:16]>.safetensors``) is accepted too. Absolute paths and
``..`` are rejected.

* ``checksum`` - SHA-256 hex of the whole file (stored in the catalogue, sent
  in KernelCatalogUpdate / KernelArtifactReady, verified before any parse).
* ``guard_digest`` - SHA-256 hex of the canonical JSON (sorted keys, no
  spaces) of ``{"blueprint_id", "parameters", "interface": {"d", "dtype",
  "input_shape": ["batch", d], "output_shape": ["batch", d]}, "torch_version"}``.
  Loading recomputes it from the manifest and compares.

Verification needs no tensor library (:func:`verify_contents`, used by the
control plane, which runs without torch): checksum, manifest, guard digest,
a well-formed safetensors header (:mod:`esper.core.safetensors_header`) whose
tensors carry the manifest's dtype, and the hash of the data section.
Loading (:mod:`esper.urza.modules`, torch) never unpickles: the module is
rebuilt from its family (:mod:`esper.urza.families`) and the tensors are
copied in with ``load_state_dict(strict=True)`` after their names, shapes
and dtypes were checked against the family.

Writes are atomic: temp file in the same directory, ``fsync``, ``os.replace``,
``fsync`` of the directory (:mod:`esper.core.files`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from esper.core import files
from esper.core.safetensors_header import HeaderError, SafetensorsHeader, parse_header
from esper.urza.errors import ChecksumMismatch, CorruptArtifact, GuardMismatch, InvalidArtifactRef

FORMAT = "esper-kernel/1"
SUFFIX = ".safetensors"
REF_SCHEME = "urza://"
TEMP_PREFIX = ".tmp-"
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Manifest dtype -> the safetensors dtype its floating tensors carry.
DTYPE_CODES: dict[str, str] = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}
#: Integer buffers (BatchNorm's ``num_batches_tracked``) keep their own dtype.
_INTEGER_CODES = frozenset({"I64"})
#: The kernel families an artifact may name (:data:`esper.urza.families.FAMILIES` builds them).
FAMILY_NAMES: frozenset[str] = frozenset(
    {
        "identity",
        "linear",
        "layer_norm",
        "activation",
        "dropout",
        "batch_norm",
        "max_pool",
        "skip_linear",
        "residual_mlp",
        "shared_resid",
        "concat",
        "layer_scale",
        "grouped",
        "highway",
        "conv1d",
        "squeeze_exc",
        "attention",
        "transformer",
        "gated_ff",
        "moe",
        "adapt_pool",
        "positional",
        "memory",
    }
)
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX16_RE = re.compile(r"^[0-9a-f]{16}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def compute_guard_digest(
    blueprint_id: str,
    parameters: Mapping[str, float],
    d: int,
    dtype: str,
    torch_version: str | None = None,
) -> str:
    """SHA-256 over the canonical JSON of the kernel's identity and interface.

    ``torch_version`` defaults to the running torch's version (importing
    torch); verification always passes the manifest's.
    """
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    payload = {
        "blueprint_id": blueprint_id,
        "parameters": {k: float(v) for k, v in parameters.items()},
        "interface": {
            "d": int(d),
            "dtype": dtype,
            "input_shape": ["batch", int(d)],
            "output_shape": ["batch", int(d)],
        },
        "torch_version": torch_version,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    blueprint_id: str
    family: str
    family_args: dict[str, int | float | str]
    parameters: dict[str, float]
    d: int
    dtype: str
    torch_version: str
    guard_digest: str
    tensors_sha256: str
    format: str = FORMAT

    def to_json(self) -> str:
        return canonical_json(
            {
                "format": self.format,
                "blueprint_id": self.blueprint_id,
                "family": self.family,
                "family_args": self.family_args,
                "parameters": self.parameters,
                "d": self.d,
                "dtype": self.dtype,
                "torch_version": self.torch_version,
                "guard_digest": self.guard_digest,
                "tensors_sha256": self.tensors_sha256,
            }
        )


# -- references and paths --------------------------------------------------------


def relative_path(blueprint_id: str, checksum: str) -> str:
    if not _ID_RE.match(blueprint_id):
        raise InvalidArtifactRef(f"invalid blueprint id {blueprint_id!r}", blueprint_id=blueprint_id)
    return f"{blueprint_id}/{checksum[:16]}{SUFFIX}"


def artifact_ref(blueprint_id: str, checksum: str) -> str:
    return f"{REF_SCHEME}{blueprint_id}/{checksum[:16]}"


def ref_to_relative(ref: str) -> str:
    """Map ``urza://BP/hex16`` or a relative ``BP/hex16.safetensors`` path to the relative path."""
    if ref.startswith(REF_SCHEME):
        parts = ref[len(REF_SCHEME) :].split("/")
        if len(parts) != 2 or not _ID_RE.match(parts[0]) or not _HEX16_RE.match(parts[1]):
            raise InvalidArtifactRef(f"malformed artifact ref {ref!r}")
        return f"{parts[0]}/{parts[1]}{SUFFIX}"
    path = PurePosixPath(ref)
    if (
        not ref
        or path.is_absolute()
        or "\\" in ref
        or ":" in ref
        or any(p in ("..", ".", "") for p in ref.split("/"))
        or not ref.endswith(SUFFIX)
    ):
        raise InvalidArtifactRef(f"artifact ref {ref!r} must be urza://<id>/<hex16> or a relative path")
    return ref


# -- writing ------------------------------------------------------------------------


fsync_dir = files.fsync_directory  # kept under its old name: Tezzeret's forge log uses it


def write_atomic(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` (:func:`esper.core.files.write_atomic`).

    The temp file starts with :data:`TEMP_PREFIX` so the library's maintenance
    sweep recognises one a crash left behind.
    """
    files.write_atomic(path, data, temp_prefix=TEMP_PREFIX)


def data_section(blob: bytes) -> bytes:
    """The raw tensor bytes after the header (what ``tensors_sha256`` covers)."""
    n = int.from_bytes(blob[:8], "little")
    return blob[8 + n :]


# -- reading ------------------------------------------------------------------------


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def family_args_ok(family: Any, args: Any) -> bool:
    return (
        family in FAMILY_NAMES
        and isinstance(args, dict)
        and all(isinstance(k, str) and isinstance(v, int | float | str) for k, v in args.items())
    )


def read_header(blob: bytes, *, source: str = "artifact") -> SafetensorsHeader:
    """The checked safetensors header (:func:`esper.core.safetensors_header.parse_header`)."""
    try:
        return parse_header(blob, max_header_bytes=MAX_HEADER_BYTES)
    except HeaderError as exc:
        raise CorruptArtifact(f"{source} is not a safetensors file ({exc})") from None


def parse_manifest(blob: bytes, *, source: str = "artifact") -> Manifest:
    """Read and validate the manifest from the safetensors header (no tensors are decoded)."""
    return _manifest_of(read_header(blob, source=source), source)


def _manifest_of(header: SafetensorsHeader, source: str) -> Manifest:
    try:
        raw = json.loads(header.metadata["esper_manifest"])
    except (ValueError, KeyError) as exc:
        raise CorruptArtifact(f"{source} has no readable esper manifest ({exc.__class__.__name__})") from None
    problems = []
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CorruptArtifact(f"{source} manifest format is not {FORMAT}")
    if not isinstance(raw.get("blueprint_id"), str) or not _ID_RE.match(raw["blueprint_id"]):
        problems.append("blueprint_id")
    if not family_args_ok(raw.get("family", ""), raw.get("family_args")):
        problems.append("family/family_args")
    params: Any = raw.get("parameters")
    if not isinstance(params, dict) or not all(isinstance(k, str) and _num(v) for k, v in params.items()):
        problems.append("parameters")
    if not isinstance(raw.get("d"), int) or isinstance(raw.get("d"), bool) or raw["d"] < 1:
        problems.append("d")
    if raw.get("dtype") not in DTYPE_CODES:
        problems.append("dtype")
    for key in ("torch_version", "guard_digest", "tensors_sha256"):
        if not isinstance(raw.get(key), str):
            problems.append(key)
    if problems:
        raise CorruptArtifact(f"{source} manifest has invalid fields: {', '.join(problems)}")
    manifest = Manifest(
        blueprint_id=raw["blueprint_id"],
        family=raw["family"],
        family_args=dict(raw["family_args"]),
        parameters={k: float(v) for k, v in dict(params).items()},
        d=raw["d"],
        dtype=raw["dtype"],
        torch_version=raw["torch_version"],
        guard_digest=raw["guard_digest"],
        tensors_sha256=raw["tensors_sha256"],
    )
    expected = compute_guard_digest(
        manifest.blueprint_id, manifest.parameters, manifest.d, manifest.dtype, manifest.torch_version
    )
    if expected != manifest.guard_digest:
        raise CorruptArtifact(f"{source} guard digest does not match its manifest")
    return manifest


def check_checksum(blob: bytes, expected: str, *, source: str, blueprint_id: str | None = None) -> str:
    """The file's SHA-256; raises ``ChecksumMismatch`` (before any parse) unless it is ``expected``."""
    actual = sha256_hex(blob)
    if actual != expected:
        raise ChecksumMismatch(
            f"{source}: sha256 {actual[:16]}… != expected {expected[:16]}…", blueprint_id=blueprint_id
        )
    return actual


def verify_contents(
    blob: bytes,
    *,
    expected_guard: str | None = None,
    blueprint_id: str | None = None,
    source: str = "artifact",
) -> Manifest:
    """Everything short of building the module, without torch; call after the checksum check.

    Checks the header layout, the manifest and its guard digest, the
    blueprint id and expected guard when given, that every floating tensor
    has the manifest's dtype, and the data section's hash. Whether the
    tensors' names and shapes fit the family is checked when a module is
    built (:func:`esper.urza.modules.instantiate`).
    """
    header = read_header(blob, source=source)
    manifest = _manifest_of(header, source)
    if blueprint_id is not None and manifest.blueprint_id != blueprint_id:
        raise CorruptArtifact(
            f"{source} holds {manifest.blueprint_id}, not {blueprint_id}", blueprint_id=blueprint_id
        )
    if expected_guard and manifest.guard_digest != expected_guard:
        raise GuardMismatch(
            f"{source}: guard digest differs from the expected one", blueprint_id=manifest.blueprint_id
        )
    allowed = {DTYPE_CODES[manifest.dtype], *_INTEGER_CODES}
    odd = sorted(name for name, entry in header.tensors.items() if entry.dtype not in allowed)
    if odd:
        raise CorruptArtifact(
            f"{source} tensors {odd[:5]} are not {manifest.dtype}", blueprint_id=manifest.blueprint_id
        )
    if sha256_hex(header.data_section(blob)) != manifest.tensors_sha256:
        raise CorruptArtifact(
            f"{source} tensor data does not match its manifest", blueprint_id=manifest.blueprint_id
        )
    return manifest
