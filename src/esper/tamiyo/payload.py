"""Policy weights on the wire and on disk: safetensors only, never pickle.

Esper-lite v1 shipped policies as ``torch.save`` pickles and loaded them with
``torch.load``, so anyone able to publish on the policy stream
could run code inside the control plane. Here a payload is a safetensors
blob: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then raw tensor bytes. Parsing it is
pure data handling, so a hostile payload can at worst be rejected.

Pickled payloads get their own reason (``unsafe_payload``) so operators can
tell an old v1 publisher or an attack from plain corruption
(``malformed_payload``); neither is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import safetensors
import safetensors.torch
import torch

#: Payloads larger than this are refused before parsing.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

# torch dtype -> safetensors dtype name accepted by ``safetensors.serialize``.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
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


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize tensors as safetensors bytes (without needing numpy)."""
    keep_alive: list[torch.Tensor] = []
    specs = {}
    for name, tensor in tensors.items():
        flat = tensor.detach().to("cpu").contiguous()
        dtype = _DTYPE_NAMES.get(flat.dtype)
        if dtype is None:
            raise ValueError(f"unsupported dtype {flat.dtype} for {name}")
        keep_alive.append(flat)
        specs[name] = safetensors.TensorSpec(
            dtype=dtype,
            shape=list(flat.shape),
            data_ptr=flat.data_ptr(),
            data_len=flat.numel() * flat.element_size(),
        )
    blob: bytes = safetensors.serialize(specs, metadata=dict(metadata) if metadata else None)
    del keep_alive
    return blob


def looks_like_pickle(payload: bytes) -> bool:
    """True for pickle streams and ``torch.save`` containers (checked by magic bytes only)."""
    if payload.startswith(_ZIP_MAGIC):
        return True
    return len(payload) >= 2 and payload[0] == _PICKLE_PROTOCOL_MARKER and 2 <= payload[1] <= 5


def read_metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors blob (plain JSON parsing)."""
    if len(payload) < 8:
        raise PayloadError("malformed_payload", "shorter than the safetensors header length")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len == 0 or 8 + header_len > len(payload):
        raise PayloadError("malformed_payload", "safetensors header length out of range")
    try:
        header = json.loads(payload[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError("malformed_payload", f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise PayloadError("malformed_payload", "header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise PayloadError("malformed_payload", "__metadata__ must map strings to strings")
    return dict(metadata)


def decode_payload(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors blob into (tensors, metadata) or raise :class:`PayloadError`.

    Tensors are cloned so they own their memory (the blob may be reused).
    """
    if not payload:
        raise PayloadError("malformed_payload", "empty payload")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError("malformed_payload", f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
    if looks_like_pickle(payload):
        raise PayloadError("unsafe_payload", "pickle/torch.save payloads are never loaded")
    metadata = read_metadata(payload)
    try:
        raw = safetensors.torch.load(payload)
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise PayloadError("malformed_payload", f"not a valid safetensors blob: {exc}") from None
    return {name: tensor.clone() for name, tensor in raw.items()}, metadata
