"""The safetensors layout, checked without a tensor library.

A safetensors blob is an 8-byte little-endian header length ``N``, ``N``
bytes of JSON, then the raw tensor data. The JSON maps each tensor name to
``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"`` map of strings.

Kernel artifacts (Urza) and policy payloads (Tamiyo) are both checked here
before any tensor byte is interpreted: the control plane runs without torch,
and a header whose offsets overlap, leave holes, run past the end or
disagree with the declared shape must be refused with a reason, not handed
to a decoder. Duplicate JSON keys are refused too, because two parsers could
pick different values for them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

#: Bytes per element of every dtype the format defines.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 16 * 1024 * 1024
_METADATA = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


class HeaderError(ValueError):
    """The blob is not a well-formed safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; ``start``/``end`` are offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    #: Offset of the data section in the blob (8 + header length).
    data_start: int

    def data_section(self, blob: bytes) -> bytes:
        return blob[self.data_start :]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise HeaderError(f"header repeats the key {key!r}")
        result[key] = value
    return result


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, raw: Any) -> TensorEntry:
    if not isinstance(raw, dict) or set(raw) != _ENTRY_KEYS:
        raise HeaderError(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise HeaderError(f"tensor {name!r} shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise HeaderError(f"tensor {name!r} data_offsets must be two non-negative integers")
    start, end = offsets
    if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise HeaderError(f"tensor {name!r} byte range does not match its shape and dtype")
    return TensorEntry(dtype=dtype, shape=tuple(shape), start=start, end=end)


def parse_header(blob: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Parse and check the header of ``blob``; raise :class:`HeaderError` unless it is well formed.

    Well formed means: the header fits in the blob and in ``max_header_bytes``,
    is a UTF-8 JSON object without repeated keys, every tensor entry is
    complete with a known dtype, and the tensors' byte ranges tile the data
    section exactly (no overlap, no gap, nothing past the end or left over).
    """
    if len(blob) < 8:
        raise HeaderError("shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", blob[:8])
    if length < 2 or length > max_header_bytes or 8 + length > len(blob):
        raise HeaderError("header length out of range")
    try:
        header = json.loads(blob[8 : 8 + length].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    metadata = header.pop(_METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    tensors = {name: _entry(name, raw) for name, raw in header.items()}
    position = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            raise HeaderError("tensor byte ranges overlap or leave a gap")
        position = entry.end
    if position != len(blob) - 8 - length:
        raise HeaderError("tensor byte ranges do not cover the data section exactly")
    return SafetensorsHeader(metadata=dict(metadata), tensors=tensors, data_start=8 + length)
