"""Policy weights on the wire and on disk: safetensors only, never pickle, never torch.

Esper-lite v1 shipped policies as ``torch.save`` pickles and loaded them with
``torch.load``, so anyone able to publish on the policy stream
could run code inside the control plane. Here a payload is a safetensors
blob: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then raw tensor bytes. Parsing it is
pure data handling - the header is checked by
:mod:`esper.core.safetensors_header` and the tensors are decoded with
safetensors' numpy API - so a hostile payload can at worst be rejected.

Pickled payloads get their own reason (``unsafe_payload``) so operators can
tell an old v1 publisher or an attack from plain corruption
(``malformed_payload``); neither is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import safetensors
import safetensors.numpy
from numpy.typing import NDArray

from esper.core.safetensors_header import HeaderError, SafetensorsHeader, parse_header

#: Payloads larger than this are refused before parsing.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

#: safetensors dtype code -> numpy dtype name (how a layout is reported; BF16 has no numpy twin).
DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}

# Leading bytes of formats that are (or wrap) pickles.
_PICKLE_PROTOCOL_MARKER = 0x80  # PROTO opcode of pickle protocols 2..5
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default zip container holds a pickle


class PayloadError(ValueError):
    """A payload that cannot be accepted; ``reason`` is a stable machine code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def encode_tensors(
    tensors: Mapping[str, NDArray[np.generic]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize arrays as safetensors bytes."""
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    blob: bytes = safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None)
    return blob


def looks_like_pickle(payload: bytes) -> bool:
    """True for pickle streams and ``torch.save`` containers (checked by magic bytes only)."""
    if payload.startswith(_ZIP_MAGIC):
        return True
    return len(payload) >= 2 and payload[0] == _PICKLE_PROTOCOL_MARKER and 2 <= payload[1] <= 5


def read_header(payload: bytes) -> SafetensorsHeader:
    """The checked header of a payload (nothing decoded) or :class:`PayloadError`."""
    if not payload:
        raise PayloadError("malformed_payload", "empty payload")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError("malformed_payload", f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
    if looks_like_pickle(payload):
        raise PayloadError("unsafe_payload", "pickle/torch.save payloads are never loaded")
    try:
        return parse_header(payload)
    except HeaderError as exc:
        raise PayloadError("malformed_payload", str(exc)) from None


def layout(header: SafetensorsHeader) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (numpy dtype name, shape), as the header declares them."""
    return {
        name: (DTYPE_NAMES.get(entry.dtype, entry.dtype.lower()), entry.shape)
        for name, entry in header.tensors.items()
    }


def decode_tensors(payload: bytes) -> dict[str, NDArray[np.generic]]:
    """Decode the tensors of a payload whose header passed :func:`read_header` into owned arrays."""
    try:
        raw = safetensors.numpy.load(payload)
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise PayloadError("malformed_payload", f"not a valid safetensors blob: {exc}") from None
    return {name: np.array(value, copy=True) for name, value in raw.items()}


def decode_payload(payload: bytes) -> tuple[dict[str, NDArray[np.generic]], dict[str, str]]:
    """Parse a safetensors blob into (arrays, metadata) or raise :class:`PayloadError`."""
    header = read_header(payload)
    return decode_tensors(payload), header.metadata
